"""Speed and size benchmark (DESIGN.md protocol): eager, Inductor and lqc measured in one run.

Per variant: prefill latency of a 512-token prompt (ms), decode throughput of 128 tokens after a
128-token prompt with a static KV cache (tokens/s), median of ``runs`` runs after warm-up; weight
bytes as stored; KV-cache bytes per token; compile time cold (fresh caches) and warm (dynamo
reset, Inductor's and lqc's caches kept). Ratios are against Inductor, measured in the same run.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from lqc.passes.report import format_table

VARIANTS = ("eager", "inductor", "lqc")


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

    def to_json(self) -> dict:
        return asdict(self)


def model_weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
    return total


class _Runner:
    """One variant's forward, driven through a prefill and a static-cache decode loop."""

    def __init__(self, model: torch.nn.Module, forward: Callable):
        self.model = model
        self.forward = forward

    def new_cache(self, length: int):
        from transformers import StaticCache

        return StaticCache(config=self.model.config, max_cache_len=length)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> float:
        cache = self.new_cache(ids.shape[1])
        start = time.perf_counter()
        self.forward(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, steps: int) -> tuple[float, float, Any]:
        """(prompt seconds, decode seconds for ``steps`` tokens, cache)."""
        length = prompt.shape[1]
        cache = self.new_cache(length + steps)
        start = time.perf_counter()
        out = self.forward(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(steps):
            position = torch.tensor([[length + i]])
            out = self.forward(input_ids=token, past_key_values=cache, use_cache=True, position_ids=position)
            token = out.logits[:, -1:].argmax(-1)
        return prompt_s, time.perf_counter() - start, cache


def _make_forward(model: torch.nn.Module, variant: str, recipe: Any, target: str) -> Callable:
    if variant == "eager":
        return model.forward
    if variant == "inductor":
        return torch.compile(model.forward)
    if variant == "lqc":
        return torch.compile(model.forward, backend="lqc", options={"recipe": recipe, "target": target, "progress": False})
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _lqc_weight_bytes() -> int | None:
    from .backend import reports

    done = [r for r in reports() if not r.fallback]
    return done[-1].bytes_after if done else None


def bench_variant(
    model: torch.nn.Module, variant: str, *, recipe: Any, target: str, prefill_ids: torch.Tensor,
    prompt_ids: torch.Tensor, decode_tokens: int, runs: int, log: Callable[[str], None] = print,
) -> VariantResult:
    torch._dynamo.reset()
    runner = _Runner(model, _make_forward(model, variant, recipe, target))

    def first_calls() -> float:
        """Seconds spent in first calls (compilation included) of the three graphs the loop uses."""
        return runner.prefill(prefill_ids) + sum(runner.decode(prompt_ids, 2)[:2])

    cold_first = first_calls()
    prefill_times = [runner.prefill(prefill_ids) for _ in range(runs)]
    decode_runs = [runner.decode(prompt_ids, decode_tokens) for _ in range(runs)]
    prompt_s = statistics.median(r[0] for r in decode_runs)
    decode_s = statistics.median(r[1] for r in decode_runs)
    steady_first = statistics.median(prefill_times) + prompt_s + 2 * decode_s / decode_tokens
    compile_cold = max(cold_first - steady_first, 0.0)

    compile_warm = 0.0
    if variant != "eager":
        torch._dynamo.reset()
        runner = _Runner(model, _make_forward(model, variant, recipe, target))
        compile_warm = max(first_calls() - steady_first, 0.0)

    cache = decode_runs[-1][2]
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    weight_bytes = model_weight_bytes(model)
    if variant == "lqc":
        weight_bytes = _lqc_weight_bytes() or weight_bytes
    result = VariantResult(
        variant=variant,
        prefill_ms=statistics.median(prefill_times) * 1e3,
        decode_tokens_per_s=decode_tokens / decode_s,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_bytes / cache.layers[0].max_cache_len,
        compile_cold_s=compile_cold,
        compile_warm_s=compile_warm,
        prefill_runs_ms=[t * 1e3 for t in prefill_times],
        decode_runs_tokens_per_s=[decode_tokens / r[1] for r in decode_runs],
    )
    log(
        f"  {variant}: prefill {result.prefill_ms:.1f} ms, decode {result.decode_tokens_per_s:.2f} tok/s, "
        f"compile {compile_cold:.1f}s cold / {compile_warm:.1f}s warm"
    )
    return result


def run_bench(
    model: torch.nn.Module, *, model_name: str, recipe: Any = "default", target: str = "auto",
    variants=VARIANTS, prefill_tokens: int = 512, prompt_tokens: int = 128, decode_tokens: int = 128,
    runs: int = 5, threads: int = 2, seed: int = 0, log: Callable[[str], None] = print,
) -> BenchResult:
    torch.set_num_threads(threads)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prefill_ids = torch.randint(0, vocab, (1, prefill_tokens), generator=gen)
    prompt_ids = torch.randint(0, vocab, (1, prompt_tokens), generator=gen)
    result = BenchResult(
        model=model_name, recipe=recipe if isinstance(recipe, (str, list, dict)) else str(recipe), target=target,
        threads=threads, prefill_tokens=prefill_tokens, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        runs=runs, torch_version=torch.__version__,
    )
    for variant in variants:
        log(f"benchmarking {variant} ...")
        result.variants.append(
            bench_variant(
                model, variant, recipe=recipe, target=target, prefill_ids=prefill_ids, prompt_ids=prompt_ids,
                decode_tokens=decode_tokens, runs=runs, log=log,
            )
        )
    torch._dynamo.reset()
    return result


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
        f"median of {result.runs}"
    )
    return head + "\n" + format_table(columns, rows)
