"""Speed and size benchmark (DESIGN.md protocol): eager, Inductor and lqc measured in one run.

Per variant: prefill latency of a 512-token prompt (ms), decode throughput of 128 tokens after a
128-token prompt with a static KV cache (tokens/s), median of ``runs`` runs after warm-up; weight
bytes as stored; KV-cache bytes per token; compile time cold (fresh caches) and warm (dynamo
reset, Inductor's and lqc's caches kept). Ratios are against Inductor, measured in the same run.
"lqc-unchecked" is lqc with ``check_inputs=False`` (no per-call token-id range check): run it
beside "lqc" to measure what the check costs on decode.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from lqc.ir.errors import LqcConfigError
from lqc.passes import DEFAULT_CACHE
from lqc.passes.report import format_table
from lqc.runtime.structural.dropped_layers import kv_cache_nbytes

from .compress import dropped_attention_layers, dropped_modules
from .pipeline import Session

VARIANTS = ("eager", "inductor", "lqc", "lqc-unchecked")
DEFAULT_VARIANTS = ("eager", "inductor", "lqc")


@dataclass
class VariantResult:
    variant: str
    prefill_ms: float
    decode_tokens_per_s: float
    weight_bytes: int
    kv_bytes_per_token: float
    compile_cold_s: float
    compile_warm_s: float
    prefill_runs_ms: list[float] = field(default_factory=list)
    decode_runs_tokens_per_s: list[float] = field(default_factory=list)


@dataclass
class BenchResult:
    model: str
    recipe: Any
    target: str
    threads: int
    prefill_tokens: int
    prompt_tokens: int
    decode_tokens: int
    runs: int
    torch_version: str
    variants: list[VariantResult] = field(default_factory=list)
    graphs_compiled_while_timing: int = 0  # must be 0: a compile inside a timed run corrupts it

    def to_json(self) -> dict:
        return asdict(self)


def stored_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao's quantized weights)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_nbytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.untyped_storage().nbytes()


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored; tensors sharing storage count once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__")
        key = tensor.untyped_storage().data_ptr() if plain else id(tensor)
        if key not in seen:
            seen.add(key)
            total += stored_nbytes(tensor)
    return total


def static_cache(config, length: int):
    """transformers' ``StaticCache`` of ``length`` slots, for a compiled decode loop. Its
    sliding-window layers (Gemma 2/3, Mistral) keep the tokens seen in a Python int that dynamo
    guards on: with ``dynamic=False`` each decode step is a new graph, and after 8 the forward runs
    uncompiled. Where the cache is no longer than a layer's window the window never slides, and a
    plain ``StaticLayer`` holds the same tokens, attended under the same sliding mask (the model
    builds it from positions): such layers are swapped for one. A longer cache is refused: its
    timings would be of uncompiled steps."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    cache = StaticCache(config=config, max_cache_len=length)
    window = getattr(config.get_text_config(decoder=True), "sliding_window", None)
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, StaticSlidingWindowLayer):
            continue
        if window is None:  # a chunked-attention layer (attention_chunk_size), held the same way
            raise LqcConfigError("this model's static cache has chunked-attention layers, which recompile every decode "
                                 "step under a compiled loop; lqc bench times models with full or sliding-window attention")
        if length > window:
            raise LqcConfigError(f"a compiled decode loop over {length} tokens slides this model's {window}-token attention "
                                 f"window, and transformers' static cache then recompiles every step; keep prompt and "
                                 f"decoded tokens within {window} (--prompt-tokens, --decode-tokens, --prefill-tokens)")
        cache.layers[i] = StaticLayer(max_cache_len=length)
    return cache


class Runner:
    """One variant's forward, driven through a prefill and a static-cache decode loop."""

    def __init__(self, model: torch.nn.Module, forward: Callable, dropped_attention: list[int] | None = None):
        self.model = model
        self.forward = forward
        # attention layers a drop_layers pass removed: their cache slots hold nothing
        self.dropped_attention = list(dropped_attention or [])
        self.session = None  # for an lqc forward: the Session whose compilations it runs

    def new_cache(self, length: int):
        from lqc.runtime.structural.dropped_layers import free_dropped_layers

        return free_dropped_layers(static_cache(self.model.config, length), self.dropped_attention)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> float:
        cache = self.new_cache(ids.shape[1])
        start = time.perf_counter()
        self.forward(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, steps: int, cache_length: int) -> tuple[float, float, Any]:
        """(prompt seconds, decode seconds for ``steps`` tokens, cache). The cache length is fixed
        by the caller: a cache of another length is another shape, and another compilation."""
        length = prompt.shape[1]
        cache = self.new_cache(cache_length)
        start = time.perf_counter()
        out = self.forward(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(steps):
            position = torch.tensor([[length + i]])
            out = self.forward(input_ids=token, cache=cache, use_cache=True, position_ids=position)
            token = out.logits[:, -1:].argmax(-1)
        return prompt_s, time.perf_counter() - start, cache


def compile_for_decode(forward: Callable, backend: Any = "inductor") -> Callable:
    """``torch.compile`` for a decode loop: static shapes, and no guards on the model's parameters
    and buffers. Those guards cost ~1.1 ms a step on SmolLM2 (dynamo checks each of ~270 tensors
    before every call, 10-15% of a fast step); a model being decoded does not change between calls.
    Every compiled variant of a benchmark gets the same treatment. Without those guards two models
    compiled with equal backends (two ``"inductor"`` strings compare equal) would share one cache
    entry and one would run the other's graph: "inductor" becomes a backend object of its own."""
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx

        backend = functools.partial(compile_fx)
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    return torch.compile(forward, backend=backend, dynamic=False, options=options)


def make_runner(model: torch.nn.Module, variant: str, recipe: Any = "default", target: str = "auto") -> Runner:
    """``variant``'s forward in a Runner; for the lqc variants, ``runner.session`` holds its compilations."""
    # dynamic=False: every variant runs the same three static graphs (prefill, prompt, decode step);
    # automatic dynamic shapes would otherwise depend on which variant saw which shape first.
    if variant == "eager":
        return Runner(model, model.forward)
    if variant == "inductor":
        return Runner(model, compile_for_decode(model.forward))
    if variant in ("lqc", "lqc-unchecked"):
        session = Session({"recipe": recipe, "target": target, "progress": False,
                           "check_inputs": variant == "lqc"})
        runner = Runner(model, compile_for_decode(model.forward, session))
        runner.session = session
        return runner
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def benchmark_calibration(loaded):
    """Calibration for a benchmark script's model: the shared calib.txt, or, for a tiny random
    model without a tokenizer, random ids (they calibrate it as well as any text)."""
    from .data import calibration_from

    if loaded.tokenizer is not None:
        return calibration_from("calib", loaded.tokenizer)
    ids = torch.randint(0, loaded.model.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(2))
    return calibration_from([ids])


def write_results(out: str | Path, payload: dict, table: str) -> None:
    """OUT.json (the figures) and OUT.md (the table) for a benchmark script; folders made."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)


def _lqc_weight_bytes(session: Session) -> int | None:
    done = [r for r in session.reports if not r.fallback]
    return done[-1].bytes_after if done else None


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _first_calls(runner: Runner, prefill_ids: torch.Tensor, prompt_ids: torch.Tensor, cache_length: int) -> float:
    """Seconds spent in the first call of each graph the benchmark uses, compilation included."""
    return runner.prefill(prefill_ids) + sum(runner.decode(prompt_ids, 2, cache_length)[:2])


def run_bench(
    model: torch.nn.Module, *, model_name: str, recipe: Any = "default", target: str = "auto",
    variants=DEFAULT_VARIANTS, prefill_tokens: int = 512, prompt_tokens: int = 128, decode_tokens: int = 128,
    runs: int = 5, threads: int = 2, seed: int = 0, log: Callable[[str], None] = print,
) -> BenchResult:
    """Compile times first, variant by variant (dynamo reset before each; "cold" on fresh caches,
    "warm" right after, with Inductor's and lqc's caches kept). Then every variant is compiled
    side by side and the timed runs are interleaved, so drift in the machine's speed (several
    percent on a 2-core machine) hits all variants alike."""
    torch.set_num_threads(threads)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    shapes = _Shapes(torch.randint(0, vocab, (1, prefill_tokens), generator=gen),
                     torch.randint(0, vocab, (1, prompt_tokens), generator=gen), prompt_tokens + decode_tokens)
    result = BenchResult(
        model=model_name, recipe=recipe if isinstance(recipe, (str, list, dict)) else str(recipe), target=target,
        threads=threads, prefill_tokens=prefill_tokens, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        runs=runs, torch_version=torch.__version__,
    )
    compiles = {v: _compile_times(model, v, recipe, target, shapes, log) for v in variants}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        prefill_times, decode_runs = _timed_runs(model, variants, recipe, target, shapes, runs, decode_tokens, result, log)
    for v in variants:
        item = _variant_result(v, compiles[v], prefill_times[v], decode_runs[v], decode_tokens)
        result.variants.append(item)
        log(
            f"  {v}: prefill {item.prefill_ms:.1f} ms, decode {item.decode_tokens_per_s:.2f} tok/s, "
            f"compile {item.compile_cold_s:.1f}s cold / {item.compile_warm_s:.1f}s warm"
        )
    torch._dynamo.reset()
    return result


@dataclass
class _Shapes:
    prefill_ids: torch.Tensor
    prompt_ids: torch.Tensor
    cache_length: int

    def first_calls(self, runner: Runner) -> float:
        return _first_calls(runner, self.prefill_ids, self.prompt_ids, self.cache_length)


def _compile_times(model, variant: str, recipe: Any, target: str, shapes: _Shapes, log) -> tuple[float, float, int]:
    """(first calls cold, first calls warm, weight bytes) of one variant. Cold: empty Inductor
    caches (on disk and in memory), lqc's transform cache emptied too. Warm: dynamo reset, both
    caches as the cold compile left them."""
    from torch._inductor.utils import fresh_cache

    log(f"compiling {variant} (cold, then warm) ...")
    with fresh_cache():
        DEFAULT_CACHE.clear()
        torch._dynamo.reset()
        runner = make_runner(model, variant, recipe, target)
        cold = shapes.first_calls(runner)
        weight_bytes = (_lqc_weight_bytes(runner.session) if runner.session is not None else None) or model_weight_bytes(model)
        torch._dynamo.reset()
        warm = shapes.first_calls(make_runner(model, variant, recipe, target))
    return cold, warm, weight_bytes


def _timed_runs(model, variants, recipe, target, shapes: _Shapes, runs: int, decode_tokens: int, result: BenchResult, log):
    runners = {v: make_runner(model, v, recipe, target) for v in variants}
    for v, runner in runners.items():
        shapes.first_calls(runner)  # compile (warm caches) and warm up
        if runner.session is not None and (dropped := dropped_attention_layers(dropped_modules(runner.session.reports))):
            # the graphs say which attention layers are gone: time with their cache slots freed
            # (another cache structure is another graph: compile it now, not in a timed run)
            runner.dropped_attention = dropped
            shapes.first_calls(runner)
    graphs_before = _graphs_compiled()
    prefill_times: dict[str, list[float]] = {v: [] for v in variants}
    decode_runs: dict[str, list] = {v: [] for v in variants}
    for run in range(runs):
        log(f"timed run {run + 1}/{runs} ...")
        # every other run in reverse order: the variant timed first in a run is not always the same one
        order = list(variants) if run % 2 == 0 else list(reversed(variants))
        for v in order:
            prefill_times[v].append(runners[v].prefill(shapes.prefill_ids))
        for v in order:
            decode_runs[v].append(runners[v].decode(shapes.prompt_ids, decode_tokens, shapes.cache_length))
    result.graphs_compiled_while_timing = _graphs_compiled() - graphs_before
    if result.graphs_compiled_while_timing:
        log(f"warning: {result.graphs_compiled_while_timing} graphs were compiled during timed runs")
    return prefill_times, decode_runs


def _variant_result(v: str, compiles: tuple[float, float, int], prefill_times: list[float], decode_runs: list,
                    decode_tokens: int) -> VariantResult:
    cold, warm, weight_bytes = compiles
    prompt_s = statistics.median(r[0] for r in decode_runs)
    decode_s = statistics.median(r[1] for r in decode_runs)
    prefill_s = statistics.median(prefill_times)
    steady_first = prefill_s + prompt_s + 2 * decode_s / decode_tokens
    cache = decode_runs[-1][2]
    compiled = v != "eager"
    return VariantResult(
        variant=v,
        prefill_ms=prefill_s * 1e3,
        decode_tokens_per_s=decode_tokens / decode_s,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_cache_nbytes(cache) / cache.layers[0].max_cache_len,  # a freed slot's zero view counts one position
        compile_cold_s=max(cold - steady_first, 0.0) if compiled else 0.0,
        compile_warm_s=max(warm - steady_first, 0.0) if compiled else 0.0,
        prefill_runs_ms=[t * 1e3 for t in prefill_times],
        decode_runs_tokens_per_s=[decode_tokens / r[1] for r in decode_runs],
    )


def format_bench(result: BenchResult) -> str:
    base = next((v for v in result.variants if v.variant == "inductor"), None)
    columns = ("variant", "prefill ms", "decode tok/s", "vs inductor", "weight MB", "KV B/token", "compile cold s", "compile warm s")
    rows = []
    for v in result.variants:
        ratio = f"{v.decode_tokens_per_s / base.decode_tokens_per_s:.3f}x" if base else "-"
        rows.append(
            [v.variant, f"{v.prefill_ms:.1f}", f"{v.decode_tokens_per_s:.2f}", ratio, f"{v.weight_bytes / 1e6:.1f}",
             f"{v.kv_bytes_per_token:,.0f}", f"{v.compile_cold_s:.1f}", f"{v.compile_warm_s:.1f}"]
        )
    head = (
        f"{result.model}, recipe {result.recipe!r}, target {result.target}, {result.threads} threads, "
        f"prefill {result.prefill_tokens} tokens, decode {result.decode_tokens} after {result.prompt_tokens}, "
        f"median of {result.runs} interleaved runs"
    )
    return head + "\n" + format_table(columns, rows)
