"""lqc demo: what the main process does with its helper's result or failure, and the options it refuses."""

from __future__ import annotations

import queue
import threading

import pytest

from lqc.demo import Variant, _compile_seconds, run_demo
from lqc.demo_helper import Helper, helper_answered, wait_for_helper
from lqc.ir import LqcConfigError


class _Process:
    def __init__(self, alive: bool, exitcode: int | None = None):
        self.alive, self.exitcode = alive, exitcode

    def is_alive(self) -> bool:
        return self.alive


def _helper(process: _Process, *answers) -> Helper:
    results = queue.Queue()
    for answer in answers:
        results.put(answer)
    return Helper(process, threading.Event(), results)


def test_a_failed_helper_is_logged_and_the_main_process_compiles_itself():
    lines = []
    helper = _helper(_Process(alive=False, exitcode=1), ("error", "RuntimeError: out of memory"))
    assert wait_for_helper(helper, lines.append, 0.0) is None
    assert "the helper process failed (RuntimeError: out of memory); compiling here" in lines[-1]


def test_a_helper_that_died_without_a_word_is_not_waited_for_forever():
    lines = []
    assert wait_for_helper(_helper(_Process(alive=False, exitcode=-9)), lines.append, 0.0) is None
    assert "the helper process failed (it exited with code -9); compiling here" in lines[-1]


def test_a_finished_helper_hands_over_its_cold_first_calls():
    helper = _helper(_Process(alive=True), ("ok", (90.0, 3.0)))
    assert wait_for_helper(helper, [].append, 0.0) == (90.0, 3.0) and helper.answer == ("ok", (90.0, 3.0))


def test_a_busy_helper_is_not_waited_for_when_only_asked():
    helper = _helper(_Process(alive=True))
    assert not helper_answered(helper) and helper.answer is None  # the eager model then scores on one thread
    helper.results.put(("ok", (1.0, 2.0)))
    assert helper_answered(helper) and wait_for_helper(helper, [].append, 0.0) == (1.0, 2.0)


def test_compile_seconds_are_what_the_first_calls_took_beyond_steady_ones():
    v = Variant("lqc max", None, None, first_calls=(90.5, 3.02), steady_step=0.02, prefill_s=[0.4, 0.6, 0.5])
    assert abs(_compile_seconds(v) - 93.0) < 1e-9
    assert _compile_seconds(Variant("float32 eager", None, None, first_calls=(2.0, 1.0))) == 0.0


@pytest.mark.parametrize("option", ["windows", "decode_tokens", "runs", "threads"])
def test_counts_below_one_are_refused_before_anything_starts(option, tmp_path):
    with pytest.raises(LqcConfigError, match=f"{option} must be at least 1; got 0"):
        run_demo(cache_dir=tmp_path / "cache", **{option: 0})
    assert not (tmp_path / "cache").exists()  # no cache folder, no helper process
