"""CPU decode speed of quantized SmolLM2-135M: lqc int8/int4 against float and torchao baselines.

DESIGN.md protocol: decode throughput (tokens/s) of ``--decode`` tokens after a 128-token prompt,
static KV cache, compiled with ``dynamic=False``, batch 1, 2 threads; every variant is compiled
and warmed up first, then the timed runs are interleaved (drift hits all variants alike) and the
median is reported. Variants:

- ``fp32-inductor``, ``bf16-inductor``: the float model under torch.compile;
- ``torchao-int8-wo-{eager,compiled}``, ``torchao-int4-g64-wo-{eager,compiled}``: torchao's
  weight-only configs on the bf16 model (its CPU int8/int4 paths want bf16 activations; the int4
  config is IntxWeightOnlyConfig, torchao 0.18's only CPU int4 weight-only one);
- ``lqc-int8``, ``lqc-int4-g64``: ``lqc::qlinear`` on torch's packed CPU kernels, through
  an lqc.Session backend with target auto (the rest of the graph through Inductor), on the float32 model
  (the kernels compute in bf16, the rest in float32); ``-bf16``: on the bf16 model, as torchao's
  rows are; ``-lm-head``: the lm_head quantized too (int4), which decode reads every step;
  ``-concat``: q/k/v and gate/up stacked first (``concat_linears``), 4 matmuls per block, not 7;
- ``torchao-int8-wo-all-*``: torchao's int8 with its default filter, the lm_head included (the
  fair anchor for lqc's ``-lm-head`` row);
- ``lqc-fp32-cleanup`` / ``lqc-fp32-concat``: the float model through lqc without and with
  ``concat_linears`` (reparameterization must not slow decode down).

    python benchmarks/quant_speed.py --out benchmarks/results/smollm2-quant-speed
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch

import lqc
from lqc.bench import Runner, model_weight_bytes, write_results

LQC_RECIPES = {  # name -> (model dtype, recipe)
    "lqc-int8": (torch.float32, [{"pass": "cleanup"}, {"pass": "quantize", "format": "int8"}]),
    "lqc-int4-g64": (torch.float32, [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 64}]),
    "lqc-int8-bf16": (torch.bfloat16, [{"pass": "cleanup"}, {"pass": "quantize", "format": "int8"}]),
    "lqc-int4-g64-bf16": (torch.bfloat16, [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 64}]),
    "lqc-int4-g64-bf16-lm-head": (torch.bfloat16, [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 64,
                                                                         "include_lm_head": True}]),
    # concat_linears first: q/k/v and gate/up stacked, 4 packed matmuls per block instead of 7
    "lqc-int8-bf16-concat": (torch.bfloat16, [{"pass": "cleanup"}, {"pass": "concat_linears"}, {"pass": "quantize", "format": "int8"}]),
    "lqc-int4-g64-bf16-concat": (torch.bfloat16, [{"pass": "cleanup"}, {"pass": "concat_linears"},
                                                  {"pass": "quantize", "format": "int4", "group_size": 64}]),
    # the float model through lqc, without and with concatenation (reparameterization's speed check)
    "lqc-fp32-cleanup": (torch.float32, [{"pass": "cleanup"}]),
    "lqc-fp32-concat": (torch.float32, [{"pass": "cleanup"}, {"pass": "concat_linears"}]),
}
BF16_VARIANTS = ("bf16-inductor", "torchao-int8-wo-eager", "torchao-int8-wo-compiled", "torchao-int4-g64-wo-eager",
                 "torchao-int4-g64-wo-compiled", "torchao-int8-wo-all-eager", "torchao-int8-wo-all-compiled",
                 *(name for name, (dtype, _) in LQC_RECIPES.items() if dtype == torch.bfloat16))


def build_variants(model: torch.nn.Module, names: list[str] | None) -> dict[str, tuple[torch.nn.Module, object, object]]:
    """name -> (model, forward, its lqc.Session or None)."""
    variants = {}

    def want(name):
        return names is None or name in names

    bf16 = copy.deepcopy(model).to(torch.bfloat16) if any(want(n) for n in BF16_VARIANTS) else None
    if want("fp32-inductor"):
        variants["fp32-inductor"] = (model, torch.compile(model.forward, dynamic=False), None)
    if want("bf16-inductor"):
        variants["bf16-inductor"] = (bf16, torch.compile(bf16.forward, dynamic=False), None)
    for tag, config in torchao_configs().items():
        if want(f"torchao-{tag}-eager") or want(f"torchao-{tag}-compiled"):
            from torchao.quantization import quantize_

            quantized = copy.deepcopy(bf16)
            # block linears only, as lqc's default; the "-all" configs take the lm_head too (torchao's own default)
            blocks_only = lambda m, fqn: isinstance(m, torch.nn.Linear) and ".layers." in f".{fqn}"  # noqa: E731
            quantize_(quantized, config, filter_fn=None if tag.endswith("-all") else blocks_only)
            if want(f"torchao-{tag}-eager"):
                variants[f"torchao-{tag}-eager"] = (quantized, quantized.forward, None)
            if want(f"torchao-{tag}-compiled"):
                variants[f"torchao-{tag}-compiled"] = (quantized, torch.compile(quantized.forward, dynamic=False), None)
    for name, (dtype, recipe) in LQC_RECIPES.items():
        if want(name):
            base = model if dtype == torch.float32 else bf16
            session = lqc.Session({"recipe": recipe, "target": "auto", "progress": False})
            variants[name] = (base, torch.compile(base.forward, backend=session, dynamic=False), session)
    return variants


def torchao_configs() -> dict:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    return {
        "int8-wo": Int8WeightOnlyConfig(),
        "int4-g64-wo": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64), mapping_type=MappingType.ASYMMETRIC),
        "int8-wo-all": Int8WeightOnlyConfig(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = lqc.models.load("smollm2-135m").model
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    cache_length = args.prompt + args.decode
    variants = build_variants(model, args.only)
    runners = {}
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for name, (module, forward, session) in variants.items():
            print(f"compiling and warming up {name} ...", flush=True)
            runners[name] = Runner(module, forward)
            runners[name].decode(prompt, min(3, args.decode), cache_length)
            done = [r for r in session.reports if not r.fallback] if session is not None else []
            runners[name].weight_bytes = done[-1].bytes_after if name.startswith("lqc") and done else model_weight_bytes(module)
        times = {name: [] for name in runners}
        for run in range(args.runs):
            print(f"timed run {run + 1}/{args.runs} ...", flush=True)
            for name, runner in runners.items():
                times[name].append(runner.decode(prompt, args.decode, cache_length)[1])
    rows = []
    for name, runner in runners.items():
        rows.append({"variant": name, "decode_tokens_per_s": args.decode / statistics.median(times[name]),
                     "runs_tokens_per_s": [args.decode / t for t in times[name]], "weight_bytes": runner.weight_bytes})
    baselines = [r for r in rows if not r["variant"].startswith("lqc")]
    fastest = max(baselines, key=lambda r: r["decode_tokens_per_s"]) if baselines else None
    lines = [f"Decode after a {args.prompt}-token prompt, {args.decode} tokens, static cache, median of {args.runs}, "
             f"{args.threads} threads, torch {torch.__version__}.", "",
             "| variant | decode tok/s | vs fastest baseline | weight MB |", "|---|---:|---:|---:|"]
    for row in rows:
        ratio = row["decode_tokens_per_s"] / fastest["decode_tokens_per_s"] if fastest else float("nan")
        row["vs_fastest_baseline"] = ratio
        lines.append(f"| {row['variant']} | {row['decode_tokens_per_s']:.2f} | {ratio:.2f}x | {row['weight_bytes'] / 1e6:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        meta = {"model": "smollm2-135m", "torch": torch.__version__, "threads": args.threads, "prompt": args.prompt,
                "decode": args.decode, "runs": args.runs, "fastest_baseline": fastest["variant"] if fastest else None}
        write_results(args.out, {**meta, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
