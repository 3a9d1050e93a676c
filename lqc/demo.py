"""``lqc demo``: what lqc does to SmolLM2-135M, in a few minutes, in one table.

Four variants in one process: float32 eager (the reference), Inductor on the bfloat16 model (the
usual way to make a model fast on a CPU), lqc ``default`` and lqc ``max`` (both through
``torch.compile(backend="lqc")`` on the float32 model). For each: weight MB as stored, perplexity
on the first ``windows`` 512-token windows of eval.txt against float32, prefill and decode
tokens/s, cold compile seconds, and one greedy sample. The decode runs are interleaved across the
variants, so drift in the machine's speed hits all alike.

One prefill graph and one decode graph per variant do everything: each eval window is a prefill
of 512 tokens into a static cache (its logits score the window and its time is the prefill
speed), then decode steps extend that cache, so no other shape is ever compiled.

Compiling is mostly single-threaded Python, so on a first run a helper process compiles lqc
``max`` (calibration and GPTQ on one thread, then Inductor) while this one compiles the other
variants; ``max`` is then traced here again and its transforms and kernels come from the shared
caches. A repeat run (the cache holds a helper's work from the same code) skips the helper.
Nothing is timed while the helper runs: prefill and decode speeds are measured afterwards, in
interleaved runs.

Caches persist under ``cache_dir`` (Inductor's compiled graphs and lqc's weight transforms), so
a repeat run skips compiling and calibrating. Results go to ``<cache_dir>/results/*.json`` and
the trade-off page ``<cache_dir>/tradeoff.html`` charts them with every recipe measured before.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .demo_helper import clock, code_fingerprint, helper_answered, helper_marker, start_helper, stop_helper, wait_for_helper
from .pipeline import Session

RECIPES = ("default", "max")
HELPER_RECIPE = "max"  # the longest to compile (calibration + GPTQ): the helper process's share


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    forward: Callable
    weight_bytes: int = 0
    compile_s: float = 0.0
    nll: float = 0.0
    scored: int = 0
    prefill_s: list[float] = field(default_factory=list)
    sample_tokens: torch.Tensor | None = None
    decode_s: list[float] = field(default_factory=list)
    kv_bytes_per_token: float = 0.0
    sample: str = ""
    first_calls: tuple[float, float] = (0.0, 0.0)  # (first prefill, first decode step) seconds: compiling
    steady_step: float = 0.0
    session: Any = None  # an lqc variant's Session: its compilations' reports give the stored bytes


def use_cache_dir(cache_dir: str | Path) -> Path:
    """Point Inductor's and lqc's on-disk caches at ``cache_dir`` (before anything compiles)."""
    cache_dir = Path(cache_dir).resolve()
    (cache_dir / "results").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["LQC_CACHE_DIR"] = str(cache_dir / "lqc")
    return cache_dir


def run_demo(*, model_name: str = "smollm2-135m", cache_dir: str | Path = ".lqc-cache", windows: int = 8,
             decode_tokens: int = 32, runs: int = 2, sample_tokens: int = 24, threads: int = 2,
             log: Callable[[str], None] = print) -> dict:
    import lqc
    from lqc.data import calibration_from, tokenize_file

    _check_options(windows=windows, decode_tokens=decode_tokens, runs=runs, threads=threads, sample_tokens=sample_tokens)
    cache_dir = use_cache_dir(cache_dir)

    torch.set_num_threads(threads)
    started, helper = time.perf_counter(), None
    cache_length = 512 + max(decode_tokens, sample_tokens) + 1
    if helper_marker(cache_dir, model_name) != code_fingerprint():  # else its caches are warm: it would only compete
        helper = start_helper(_helper_main, model_name, str(cache_dir), cache_length, threads, started)  # it imports while this one loads
        log(f"[{clock(started)}] helper process: compiling lqc {HELPER_RECIPE} on the other core (log: {cache_dir / 'helper.log'})")
    try:
        model, tokenizer, name = lqc.models.load(model_name)
        if tokenizer is None:
            raise lqc.LqcConfigError(f"lqc demo scores text and {name} has no tokenizer: give a model that has one "
                                     f"(smollm2-135m, a Hugging Face model directory or a .gguf file)")
        log(f"[{clock(started)}] loaded {name}")
        if helper:
            helper.loaded.set()
        ids = tokenize_file("eval", tokenizer)
        window_ids = [ids[i * 512 : (i + 1) * 512][None] for i in range(windows)]
        variants = _variants(model, calibration_from("calib", tokenizer), tokenizer)
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
            # compiling first (one core each, with the helper); the eager reference scores last, and
            # the helper's recipe after the helper is done
            order = {"inductor bf16": 0, "lqc default": 1, "float32 eager": 2, f"lqc {HELPER_RECIPE}": 3}
            for v in sorted(variants, key=lambda v: order.get(v.name, 2)):
                if helper and v.name == f"lqc {HELPER_RECIPE}":
                    helped = wait_for_helper(helper, log, started)
                    helper_marker(cache_dir, model_name, write=code_fingerprint() if helped else "")
                log(f"[{clock(started)}] {v.name}: compiling and scoring {windows} windows ...")
                # the eager model compiles nothing: while the helper runs, one thread (two OpenMP pools
                # on two cores spin against each other; compiled variants keep the count they run with)
                eager_alone = v.name == "float32 eager" and helper is not None and not helper_answered(helper)
                torch.set_num_threads(1 if eager_alone else threads)
                with _helper_threads(threads) if v.name == f"lqc {HELPER_RECIPE}" else contextlib.nullcontext():
                    _score(v, window_ids, cache_length)
                torch.set_num_threads(threads)
                if helper and v.name == f"lqc {HELPER_RECIPE}" and helped:
                    v.first_calls = helped  # its cold compile happened in the helper
                log(f"[{clock(started)}] {v.name}: perplexity {math.exp(v.nll / v.scored):.3f}")
            for run in range(runs):
                log(f"[{clock(started)}] timed run {run + 1}/{runs}: prefill a window, decode {decode_tokens} tokens, per variant ...")
                for v in variants:
                    _timed_run(v, window_ids, cache_length, decode_tokens, tokenizer, sample_tokens)
    finally:
        if helper:
            stop_helper(helper)
    for v in variants:
        v.compile_s = _compile_seconds(v)
    rows = _rows(variants, name, windows, decode_tokens)
    for row in rows:
        row["sample_prompt"] = tokenizer.decode(window_ids[0][0, -12:])
    _write_results(rows, cache_dir / "results")
    log(f"[{clock(started)}] done")
    return {"rows": rows, "seconds": time.perf_counter() - started, "cache_dir": str(cache_dir)}


def _check_options(**values: int) -> None:
    """Checked before a helper process or a model load starts."""
    from lqc.ir.errors import LqcConfigError

    for option, value in values.items():
        least = 0 if option == "sample_tokens" else 1
        if value < least:
            raise LqcConfigError(f"lqc demo: {option} must be at least {least}; got {value}")


def _variants(model, calibration, tokenizer) -> list[Variant]:
    from lqc.bench import model_weight_bytes

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    variants = [Variant("float32 eager", model, model.forward, model_weight_bytes(model)),
                Variant("inductor bf16", bf16, torch.compile(bf16.forward, dynamic=False), model_weight_bytes(bf16))]
    return variants + [_recipe_variant(recipe, model, calibration, tokenizer) for recipe in RECIPES]


def _recipe_variant(recipe: str, model, calibration, tokenizer) -> Variant:
    # default needs no calibration data (and shows what a user gets without it); max calibrates
    options = {"recipe": recipe, "target": "auto", "progress": True, "tokenizer": tokenizer,  # calibration bars
               "calibration": calibration if recipe == "max" else None}
    session = Session(options)
    return Variant(f"lqc {recipe}", model, torch.compile(model.forward, backend=session, dynamic=False), session=session)


def _new_cache(model, length: int):
    from lqc.bench import static_cache

    return static_cache(model.config, length)


def _score(v: Variant, window_ids: list[torch.Tensor], cache_length: int) -> None:
    """Every window prefilled into a fresh static cache; its logits score it. The first prefill
    and the first decode step compile (their times are kept); nothing else here is timed, since
    the helper process may be running."""
    from lqc.evaluate import window_nll

    cache = None
    for i, window in enumerate(window_ids):
        cache = _new_cache(v.model, cache_length)
        start = time.perf_counter()
        logits = v.forward(input_ids=window, cache=cache, use_cache=True).logits
        prefill = time.perf_counter() - start
        v.nll += window_nll(logits, window)
        v.scored += window.shape[1] - 1
        if i == 0:  # the decode graph compiles on its first step
            token = logits[:, -1:].argmax(-1)
            v.first_calls = (prefill, _step(v, cache, token, window.shape[1]))
            v.steady_step = _step(v, cache, token, window.shape[1] + 1)
    v.kv_bytes_per_token = _kv_bytes_per_token(v, cache, cache_length)
    done = [r for r in v.session.reports if not r.fallback] if v.session is not None else []
    if done:
        v.weight_bytes = done[-1].bytes_after


def _step(v: Variant, cache, token: torch.Tensor, position: int) -> float:
    start = time.perf_counter()
    v.forward(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[position]]))
    return time.perf_counter() - start


def _timed_run(v: Variant, window_ids: list[torch.Tensor], cache_length: int, steps: int, tokenizer,
               sample_tokens: int) -> None:
    """Prefill the first window into a fresh cache, then ``steps`` greedy tokens after it: each
    step one call of the decode graph. The sample is the greedy text after the window's last words."""
    cache = _new_cache(v.model, cache_length)
    start = time.perf_counter()
    logits = v.forward(input_ids=window_ids[0], cache=cache, use_cache=True).logits
    v.prefill_s.append(time.perf_counter() - start)
    token = logits[:, -1:].argmax(-1)
    tokens = [token]
    start = time.perf_counter()
    for i in range(steps):
        out = v.forward(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[window_ids[0].shape[1] + i]]))
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    v.decode_s.append(time.perf_counter() - start)
    v.sample_tokens = torch.cat(tokens, dim=1)
    v.sample = tokenizer.decode(v.sample_tokens[0, :sample_tokens])


def _compile_seconds(v: Variant) -> float:
    """What the first prefill and the first decode step took beyond steady ones: compiling."""
    if v.name == "float32 eager":
        return 0.0
    first_prefill, first_step = v.first_calls
    return max(first_prefill - statistics.median(v.prefill_s), 0.0) + max(first_step - v.steady_step, 0.0)


def _helper_main(model_name: str, cache_dir: str, cache_length: int, threads: int, loaded, results,
                 started: float) -> None:
    """``started``: the main process's clock at the start (perf_counter is system-wide on Linux),
    so that the helper's log lines carry the same times as the main process's."""
    try:
        log = open(Path(cache_dir) / "helper.log", "w", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        print(f"[{clock(started)}] helper started; waiting for the main process to load {model_name}")
        if not loaded.wait(timeout=1800):  # the main process died before loading the model
            raise TimeoutError("the main process never loaded the model")
        print(f"[{clock(started)}] compiling lqc {HELPER_RECIPE}")
        first_calls = _helper_compile(model_name, cache_dir, cache_length, threads)
        print(f"\n[{clock(started)}] done: first prefill {first_calls[0]:.1f} s, first decode step {first_calls[1]:.1f} s")
        results.put(("ok", first_calls))
    except BaseException as exc:  # noqa: BLE001  (the main process compiles instead; the message says why)
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _helper_compile(model_name: str, cache_dir: str, cache_length: int, threads: int) -> tuple[float, float]:
    """In the helper: the same model, options and calls as the main process's first window of
    ``HELPER_RECIPE``, so the graphs, weight transforms and Inductor kernels are the same ones.

    On one thread: the weight transforms (calibration, GPTQ) run while the main process compiles
    on the other core, and two busy OpenMP pools on two cores slow both far more than they gain.
    Inductor's kernels are still made for ``threads``, the count they will run with in the main
    process (``_helper_threads``). Returns the (first prefill, first decode step) seconds of a
    cold compile."""
    use_cache_dir(cache_dir)
    import lqc
    from lqc.data import calibration_from, tokenize_file

    model, tokenizer, _ = lqc.models.load(model_name)  # the copy the main process converted and kept
    calibration = calibration_from("calib", tokenizer)
    window = tokenize_file("eval", tokenizer)[:512][None]  # the main process's first window
    torch.set_num_threads(1)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64), _helper_threads(threads):
        v = _recipe_variant(HELPER_RECIPE, model, calibration, tokenizer)
        _score(v, [window], cache_length)
    return v.first_calls


def _helper_threads(threads: int):
    """Inductor's CPU kernels are generated for a thread count: by default torch's current one,
    which the helper keeps at one. Naming it makes the helper's kernels the main process's (the
    count is part of Inductor's cache key, so both processes compile ``HELPER_RECIPE`` under this)."""
    import torch._inductor.config

    return torch._inductor.config.patch({"cpp.threads": threads})


def _kv_bytes_per_token(v: Variant, cache, cache_length: int) -> float:
    """Bytes per token of the KV cache this variant keeps: the static cache's buffers, or, where
    the recipe compresses the cache (compress_kv), the compressed cache's at this length."""
    from lqc.recipes import resolve_recipe
    from lqc.runtime.structural.dropped_layers import kv_cache_nbytes
    from lqc.runtime.kv.cache import kv_cache_report

    recipe = resolve_recipe(v.name.removeprefix("lqc "))["passes"] if v.name.startswith("lqc") else []
    kv = next((e for e in recipe if e["pass"] == "compress_kv"), None)
    if kv is None:
        return kv_cache_nbytes(cache) / cache_length
    options = {k: kv[k] for k in ("bits", "group", "residual", "sinks") if k in kv}
    return kv_cache_report(v.model.config, cache_length, element_bytes=4, **options)["bytes_per_token"]


def _rows(variants: list[Variant], model_name: str, windows: int, decode_tokens: int) -> list[dict]:
    reference = math.exp(variants[0].nll / variants[0].scored)
    fp32_bytes = variants[0].weight_bytes
    base = next(v for v in variants if v.name == "inductor bf16")
    base_decode = decode_tokens / statistics.median(base.decode_s)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    for v in variants:
        ppl = math.exp(v.nll / v.scored)
        decode = decode_tokens / statistics.median(v.decode_s)
        rows.append({
            "model": model_name, "recipe": v.name.removeprefix("lqc "), "kind": "recipe" if v.name.startswith("lqc") else "baseline",
            "weight_bytes": v.weight_bytes, "fp32_weight_bytes": fp32_bytes, "ppl": ppl, "ppl_reference": reference,
            "ppl_delta_pct": (ppl / reference - 1) * 100, "windows": windows, "scored_tokens": v.scored,
            "prefill_tokens_per_s": 512 / statistics.median(v.prefill_s), "decode_tokens_per_s": decode,
            "baseline": "inductor bf16", "baseline_decode_tokens_per_s": base_decode, "decode_vs_baseline": decode / base_decode,
            "compile_cold_s": v.compile_s, "kv_bytes_per_token": v.kv_bytes_per_token, "sample": v.sample,
            "measured_at": now, "command": "make demo", "torch": torch.__version__,
        })
    return rows


def _write_results(rows: list[dict], folder: Path) -> None:
    for row in rows:
        slug = row["recipe"].replace(" ", "-")
        (folder / f"demo-{slug}.json").write_text(json.dumps(row, indent=1) + "\n")


def format_demo(result: dict) -> str:
    from lqc.passes.report import format_table

    rows = result["rows"]
    head = (f"{rows[0]['model']}: perplexity on {rows[0]['windows']} windows of eval.txt ({rows[0]['scored_tokens']:,} tokens), "
            f"prefill 512 tokens, decode after a 512-token window, median of the interleaved runs, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    columns = ("variant", "weight MB", "vs fp32", "ppl", "ppl delta", "KV B/token", "prefill tok/s", "decode tok/s",
               "vs inductor bf16", "compile s")
    table = format_table(columns, [
        [r["recipe"] if r["kind"] == "baseline" else f"lqc {r['recipe']}", f"{r['weight_bytes'] / 1e6:.1f}",
         f"{r['weight_bytes'] / r['fp32_weight_bytes']:.3f}x", f"{r['ppl']:.3f}", f"{r['ppl_delta_pct']:+.2f}%",
         f"{r['kv_bytes_per_token']:,.0f}", f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_vs_baseline']:.2f}x",
         f"{r['compile_cold_s']:.1f}"] for r in rows])
    samples = "\n".join(f"  {r['recipe']:>14}: ...{r['sample']!r}" for r in rows)
    return f"{head}\n{table}\ngreedy continuations of eval.txt's first window (...{rows[0]['sample_prompt']!r}):\n{samples}\n"
