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

Caches persist under ``cache_dir`` (Inductor's compiled graphs and lqc's weight transforms), so
a repeat run skips compiling and calibrating. Results go to ``<cache_dir>/results/*.json`` and
the trade-off page ``<cache_dir>/tradeoff.html`` charts them with every recipe measured before.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RECIPES = ("default", "max")


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
    decode_s: list[float] = field(default_factory=list)
    kv_bytes_per_token: float = 0.0
    sample: str = ""
    prefilled: tuple = ()  # (static cache after the first window, its next token)


def use_cache_dir(cache_dir: str | Path) -> Path:
    """Point Inductor's and lqc's on-disk caches at ``cache_dir`` (before anything compiles)."""
    cache_dir = Path(cache_dir).resolve()
    (cache_dir / "results").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["LQC_CACHE_DIR"] = str(cache_dir / "lqc")
    return cache_dir


def run_demo(*, model_name: str = "smollm2-135m", cache_dir: str | Path = ".lqc-cache", windows: int = 8,
             decode_tokens: int = 64, runs: int = 2, sample_tokens: int = 24, threads: int = 2,
             log: Callable[[str], None] = print) -> dict:
    cache_dir = use_cache_dir(cache_dir)
    import lqc
    from lqc.data import calibration_from, tokenize_file

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, tokenizer, name = lqc.models.load(model_name)
    if tokenizer is None:
        raise lqc.LqcConfigError(f"lqc demo scores text and {name} has no tokenizer: give a model that has one "
                                 f"(smollm2-135m, a Hugging Face model directory or a .gguf file)")
    log(f"[{_clock(started)}] loaded {name}")
    ids = tokenize_file("eval", tokenizer)
    window_ids = [ids[i * 512 : (i + 1) * 512][None] for i in range(windows)]
    calibration = calibration_from("calib", tokenizer)
    variants = _variants(model, calibration, tokenizer)
    cache_length = 512 + max(decode_tokens, sample_tokens) + 1
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for v in variants:
            log(f"[{_clock(started)}] {v.name}: compiling and scoring {windows} windows ...")
            _score(v, window_ids, cache_length)
            log(f"[{_clock(started)}] {v.name}: perplexity {math.exp(v.nll / v.scored):.3f}, compiled in {v.compile_s:.1f}s")
        for run in range(runs):
            log(f"[{_clock(started)}] timed decode run {run + 1}/{runs} ({decode_tokens} tokens per variant) ...")
            for v in variants:
                seconds, tokens = _decode(v, window_ids[0].shape[1], decode_tokens)
                v.decode_s.append(seconds)
                v.sample = tokenizer.decode(tokens[0, :sample_tokens])  # greedy, after the window's last words
    prompt = tokenizer.decode(window_ids[0][0, -12:])
    rows = _rows(variants, name, windows, decode_tokens)
    for row in rows:
        row["sample_prompt"] = prompt
    _write_results(rows, cache_dir / "results")
    log(f"[{_clock(started)}] done")
    return {"rows": rows, "seconds": time.perf_counter() - started, "cache_dir": str(cache_dir)}


def _variants(model, calibration, tokenizer) -> list[Variant]:
    from lqc.bench import model_weight_bytes

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    variants = [Variant("float32 eager", model, model.forward, model_weight_bytes(model)),
                Variant("inductor bf16", bf16, torch.compile(bf16.forward, dynamic=False), model_weight_bytes(bf16))]
    for recipe in RECIPES:
        # default needs no calibration data (and shows what a user gets without it); max calibrates
        options = {"recipe": recipe, "target": "auto", "progress": True, "tokenizer": tokenizer,  # calibration bars
                   "calibration": calibration if recipe == "max" else None}
        variants.append(Variant(f"lqc {recipe}", model, torch.compile(model.forward, backend="lqc", options=options, dynamic=False)))
    return variants


def _new_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _score(v: Variant, window_ids: list[torch.Tensor], cache_length: int) -> None:
    """Every window prefilled into a fresh static cache: its logits score it, its time is prefill
    speed. What the first prefill and the first decode step take beyond a steady one is compiling."""
    import lqc

    first = len(lqc.reports())
    timings, cache = [], None
    for window in window_ids:
        cache = _new_cache(v.model, cache_length)
        start = time.perf_counter()
        logits = v.forward(input_ids=window, cache=cache, use_cache=True).logits
        timings.append(time.perf_counter() - start)
        logprobs = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        v.nll -= float(logprobs.gather(-1, window[0, 1:, None]).sum())
        v.scored += window.shape[1] - 1
        if len(timings) == 1:  # the decode graph compiles on its first step
            token = logits[:, -1:].argmax(-1)
            v.prefilled = (copy.deepcopy(cache), token)  # where every timed decode run starts
            first_step = _step(v, cache, token, window.shape[1])
            steady_step = _step(v, cache, token, window.shape[1] + 1)
    v.prefill_s = timings[1:] or timings
    if v.name != "float32 eager":
        v.compile_s = max(timings[0] - statistics.median(v.prefill_s), 0.0) + max(first_step - steady_step, 0.0)
    v.kv_bytes_per_token = _kv_bytes_per_token(v, cache, cache_length)
    done = [r for r in lqc.reports()[first:] if not r.fallback]
    if v.name.startswith("lqc") and done:
        v.weight_bytes = done[-1].bytes_after


def _step(v: Variant, cache, token: torch.Tensor, position: int) -> float:
    start = time.perf_counter()
    v.forward(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[position]]))
    return time.perf_counter() - start


def _decode(v: Variant, window_length: int, steps: int) -> tuple[float, torch.Tensor]:
    """(seconds, tokens) of ``steps`` greedy tokens after the window: from a copy of the cache the
    window's prefill left (scoring kept it), each step is one call of the decode graph."""
    cache, token = copy.deepcopy(v.prefilled[0]), v.prefilled[1]
    tokens = [token]
    start = time.perf_counter()
    for i in range(steps):
        out = v.forward(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[window_length + i]]))
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    return time.perf_counter() - start, torch.cat(tokens, dim=1)


def _kv_bytes_per_token(v: Variant, cache, cache_length: int) -> float:
    """Bytes per token of the KV cache this variant keeps: the static cache's buffers, or, where
    the recipe compresses the cache (compress_kv), the compressed cache's at this length."""
    from lqc.recipes import resolve_recipe
    from lqc.runtime.dropped_layers import kv_cache_nbytes
    from lqc.runtime.kv_cache import kv_cache_report

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


def _clock(started: float) -> str:
    return f"{time.perf_counter() - started:6.1f}s"
