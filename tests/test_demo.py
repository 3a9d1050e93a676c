"""lqc demo's helper process: what the main process does with its result or its failure."""

from __future__ import annotations

from lqc.demo import Variant, _compile_seconds, _wait_for_helper


class _Pending:
    def __init__(self, result=None, error=None):
        self.result, self.error = result, error

    def get(self):
        if self.error:
            raise self.error
        return self.result


def test_a_failed_helper_is_logged_and_the_main_process_compiles_itself():
    lines = []
    assert _wait_for_helper((None, _Pending(error=RuntimeError("out of memory"))), lines.append, 0.0) is None
    assert "the helper process failed (RuntimeError: out of memory); compiling here" in lines[-1]


def test_a_finished_helper_hands_over_its_cold_first_calls():
    assert _wait_for_helper((None, _Pending(result=(90.0, 3.0))), [].append, 0.0) == (90.0, 3.0)


def test_compile_seconds_are_what_the_first_calls_took_beyond_steady_ones():
    v = Variant("lqc max", None, None, first_calls=(90.5, 3.02), steady_step=0.02, prefill_s=[0.4, 0.6, 0.5])
    assert abs(_compile_seconds(v) - 93.0) < 1e-9
    assert _compile_seconds(Variant("float32 eager", None, None, first_calls=(2.0, 1.0))) == 0.0
