"""Quantization quality on SmolLM2-135M: lqc's formats and methods against torchao's configs.

Every row is measured on the same evaluation windows (DESIGN.md protocol: non-overlapping
512-token windows of eval.txt, float32 reference, full = 128 windows) with the same calibration
text for the calibrated methods; one run measures every config in one process. ``--resume``
keeps the rows (and the float32 reference) already in OUT.json and measures the others, e.g.
after adding a config. lqc rows use the reference qlinear math
(``kernels: false``: dequantize, then a float32 matmul) and torchao rows its float32 path, so the
table compares quantization error alone; the packed CPU kernels compute in bfloat16 and are
measured for speed by benchmarks/quant_speed.py.

    python benchmarks/quant_quality.py --windows 128 --out benchmarks/results/smollm2-quant-quality
    python benchmarks/quant_quality.py --windows 16 --only lqc-int8 torchao-int8-wo   # a quick look

torchao 0.18 on a CPU: Int4WeightOnlyConfig needs CUDA (or the mslk package) in every packing
format, so its CPU int4 weight-only config is IntxWeightOnlyConfig(int4, PerGroup(g)); both its
symmetric default and the asymmetric (zero point) mapping are measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import lqc
from lqc.bench import stored_nbytes, write_results
from lqc.data import calibration_from, data_file, tokenize_file
from lqc.evaluate import causal_lm_logits, perplexity


def lqc_quantize(**options) -> list[dict]:
    return [{"pass": "cleanup"}, {"pass": "quantize", "kernels": False, **options}]


def lqc_rotated(**options) -> list[dict]:
    """QuaRot: the residual stream rotated (and an online Hadamard before each down projection) first."""
    return [{"pass": "cleanup"}, {"pass": "rotate"}, {"pass": "quantize", "kernels": False, **options}]


def lqc_eora(rank: int, **options) -> list[dict]:
    """Quantized, then a rank-r EoRA compensation path on every quantized linear (int8 factors)."""
    return lqc_quantize(**options) + [{"pass": "lowrank", "rank": rank, "calibration_tokens": 16384}]


GPTQ_MSE = dict(format="int4", group_size=64, method="gptq", act_order=True, gptq_params="mse", calibration_tokens=65536)


LQC_CONFIGS = {
    "lqc-int8": lqc_quantize(format="int8"),
    "lqc-int8-gptq": lqc_quantize(format="int8", method="gptq"),
    "lqc-int4-g32-rtn": lqc_quantize(format="int4", group_size=32),
    "lqc-int4-g64-rtn": lqc_quantize(format="int4", group_size=64),
    "lqc-int4-g64-hqq": lqc_quantize(format="int4", group_size=64, method="hqq"),
    "lqc-int4-g64-gptq": lqc_quantize(format="int4", group_size=64, method="gptq", act_order=True),
    "lqc-int4-g64-gptq-clip": lqc_quantize(format="int4", group_size=64, method="gptq", act_order=True, gptq_params="clip"),
    "lqc-int4-g64-awq": lqc_quantize(format="int4", group_size=64, method="awq"),
    "lqc-int4-g64-awq-gptq": lqc_quantize(format="int4", group_size=64, method="awq", awq_gptq=True, act_order=True, gptq_params="clip"),
    "lqc-int4-g128-rtn": lqc_quantize(format="int4", group_size=128),
    "lqc-int4-g64-gptq-clip-lm-head": lqc_quantize(format="int4", group_size=64, method="gptq", act_order=True, gptq_params="clip",
                                                   include_lm_head=True),
    "lqc-int4-g128-gptq-clip": lqc_quantize(format="int4", group_size=128, method="gptq", act_order=True, gptq_params="clip"),
    "lqc-int4-g128-awq": lqc_quantize(format="int4", group_size=128, method="awq"),
    "lqc-w8a8": lqc_quantize(format="w8a8"),
    "lqc-w8a8-smooth": lqc_quantize(format="w8a8", smoothquant=True),
    "lqc-fp8": lqc_quantize(format="fp8"),
    "lqc-fp8-dyn": lqc_quantize(format="fp8_dyn"),
    "lqc-int4-g64-gptq-mse": lqc_quantize(**GPTQ_MSE),
    "lqc-rot-int4-g64-rtn": lqc_rotated(format="int4", group_size=64),
    "lqc-rot-int4-g64-gptq-mse": lqc_rotated(**GPTQ_MSE),
    "lqc-rot-w8a8": lqc_rotated(format="w8a8"),
    "lqc-rot-int4-g128-rtn": lqc_rotated(format="int4", group_size=128),
    "lqc-int4-g256-rtn": lqc_quantize(format="int4", group_size=256),
    "lqc-rot-int4-g256-rtn": lqc_rotated(format="int4", group_size=256),
    "lqc-int4-g64-rtn-eora16": lqc_eora(16, format="int4", group_size=64),
    "lqc-int4-g64-rtn-eora32": lqc_eora(32, format="int4", group_size=64),
    "lqc-int4-g64-rtn-eora64": lqc_eora(64, format="int4", group_size=64),
    "lqc-int4-g64-hqq-eora16": lqc_eora(16, format="int4", group_size=64, method="hqq"),
    "lqc-int4-g64-gptq-mse-eora16": lqc_eora(16, **GPTQ_MSE),
    "lqc-int4-g128-rtn-eora16": lqc_eora(16, format="int4", group_size=128),
    "lqc-int4-g128-gptq-clip-eora16": lqc_eora(16, format="int4", group_size=128, method="gptq", act_order=True, gptq_params="clip"),
}


ORDER = [
    "lqc-int8", "lqc-int8-gptq", "torchao-int8-wo",
    "lqc-int4-g64-rtn", "lqc-int4-g64-hqq", "lqc-int4-g64-awq", "lqc-int4-g64-gptq-clip", "torchao-int4-g64-wo",
    "torchao-int4-g64-wo-asym",
    "lqc-w8a8", "lqc-w8a8-smooth", "torchao-w8a8-dyn", "lqc-fp8",
    "lqc-int4-g128-awq", "lqc-fp8-dyn", "lqc-int4-g128-rtn", "torchao-int4-g128-wo-asym",
    "lqc-int4-g64-awq-gptq", "lqc-int4-g128-gptq-clip", "lqc-int4-g64-gptq", "lqc-int4-g32-rtn", "lqc-int4-g64-gptq-clip-lm-head",
    "lqc-int4-g64-gptq-mse", "lqc-rot-int4-g64-rtn", "lqc-rot-int4-g64-gptq-mse", "lqc-rot-w8a8",
    "lqc-rot-int4-g128-rtn", "lqc-int4-g256-rtn", "lqc-rot-int4-g256-rtn",
    "lqc-int4-g64-rtn-eora16", "lqc-int4-g64-gptq-mse-eora16", "lqc-int4-g128-gptq-clip-eora16", "lqc-int4-g128-rtn-eora16",
    "lqc-int4-g64-rtn-eora32", "lqc-int4-g64-rtn-eora64", "lqc-int4-g64-hqq-eora16",
]


def torchao_configs() -> dict:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    return {
        "torchao-int8-wo": Int8WeightOnlyConfig(),
        "torchao-int4-g64-wo": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)),
        "torchao-int4-g64-wo-asym": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64), mapping_type=MappingType.ASYMMETRIC),
        "torchao-int4-g128-wo-asym": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128), mapping_type=MappingType.ASYMMETRIC),
        "torchao-w8a8-dyn": Int8DynamicActivationInt8WeightConfig(),
    }


def block_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def run_lqc(model, tokenizer, recipe, calibration, ids, windows):
    torch._dynamo.reset()  # every config compiles the same forward: start from an empty dynamo cache
    start = time.perf_counter()
    compressed = lqc.compress(model, recipe, calibration=calibration, tokenizer=tokenizer, progress=False)
    seconds = time.perf_counter() - start
    report = lqc.session_of(compressed).reports[-1]
    record = next(r for r in reversed(report.records) if r.name == "quantize" and r.stage == "recipe")  # lowering follows
    layers = record.details.layers
    # EoRA factors are stored beside the quantized weights: counted with them
    factor_bytes = sum(r.details.factor_bytes for r in report.records if r.name == "lowrank" and r.stage == "recipe")
    result = perplexity(causal_lm_logits(compressed), ids, max_windows=windows, progress=False)
    return result, {
        "linear_bytes_fp32": sum(layer.bytes_before for layer in layers),
        "linear_bytes_stored": sum(layer.bytes_after for layer in layers) + factor_bytes,
        "quantized_layers": len(layers), "compress_seconds": round(seconds, 1),
    }


def run_torchao(model, config, ids, windows):
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model)
    names = {n for n, _ in block_linears(quantized)}  # the lm_head is left alone, as lqc does
    before = sum(m.weight.numel() * m.weight.element_size() for _, m in block_linears(quantized))
    start = time.perf_counter()
    quantize_(quantized, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn in names)
    seconds = time.perf_counter() - start
    after = sum(stored_nbytes(m.weight) for n, m in quantized.named_modules() if n in names)
    result = perplexity(causal_lm_logits(quantized), ids, max_windows=windows, progress=False)
    return result, {"linear_bytes_fp32": before, "linear_bytes_stored": after, "quantized_layers": len(names),
                    "compress_seconds": round(seconds, 1)}


def markdown(rows: list[dict], reference: dict) -> str:
    lines = [
        f"Perplexity on eval.txt, {reference['windows']} windows of {reference['window_length']} tokens "
        f"({reference['scored_tokens']:,} scored tokens). float32: {reference['perplexity']:.4f}.",
        "",
        "| config | perplexity | vs float32 | linear bytes / fp16 | stored MB | compress s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | cannot run: {row['error'][:120]} | | | | |")
            continue
        fp16 = row["linear_bytes_fp32"] / 2
        lines.append(
            f"| {row['config']} | {row['perplexity']:.4f} | {row['delta_pct']:+.2f}% | "
            f"{row['linear_bytes_stored'] / fp16:.3f} | {row['linear_bytes_stored'] / 1e6:.1f} | {row['compress_seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--only", nargs="*", default=None, help="config names (default: all)")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep OUT.json's rows (same windows) and measure the rest")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = lqc.models.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    calibration = calibration_from("calib", tokenizer)
    try:
        anchors = torchao_configs()
    except ImportError:  # an optional anchor: pip install --no-deps torchao==0.18.0
        print("torchao is not installed: its rows are left out", flush=True)
        anchors = {}
    configs = {**{k: ("lqc", v) for k, v in LQC_CONFIGS.items()}, **{k: ("torchao", v) for k, v in anchors.items()}}
    configs = {name: configs[name] for name in ORDER if name in configs}  # each lqc format next to its torchao anchors
    unknown = set(args.only or []) - set(configs)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; valid: {', '.join(configs)}")
    previous = json.loads(Path(args.out).with_suffix(".json").read_text()) if args.resume and args.out else None
    if previous and previous["reference"]["windows"] != args.windows:
        parser.error(f"--resume: {args.out}.json has {previous['reference']['windows']} windows, not {args.windows}")
    with torch.no_grad():
        if previous:
            reference, rows = previous["reference"], previous["rows"]
        else:
            reference = perplexity(causal_lm_logits(model), ids, max_windows=args.windows, progress=False).to_json()
            rows = []
        print(f"float32: {reference['perplexity']:.4f} ({reference['scored_tokens']} tokens, {reference['seconds']:.0f}s)", flush=True)
        done = {row["config"] for row in rows}
        for name, (kind, config) in configs.items():
            if (args.only is not None and name not in args.only) or name in done:
                continue
            try:
                if kind == "lqc":
                    result, extra = run_lqc(model, tokenizer, config, calibration, ids, args.windows)
                else:
                    result, extra = run_torchao(model, config, ids, args.windows)
            except Exception as exc:  # noqa: BLE001 - a config that cannot run is a row saying why
                rows.append({"config": name, "recipe": config if kind == "lqc" else repr(config), "error": f"{type(exc).__name__}: {exc}"})
                print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            assert result.scored_tokens == reference["scored_tokens"]
            row = {"config": name, "recipe": config if kind == "lqc" else repr(config), "perplexity": result.perplexity,
                   "delta_pct": 100 * (result.perplexity / reference["perplexity"] - 1), **extra}
            rows.append(row)
            print(f"{name}: {row['perplexity']:.4f} ({row['delta_pct']:+.2f}%), stored/fp16 "
                  f"{row['linear_bytes_stored'] / (row['linear_bytes_fp32'] / 2):.3f}, {result.seconds:.0f}s eval", flush=True)
            if args.out:  # written after every row: a long run keeps what it measured
                meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads}
                write_results(args.out, {**meta, "reference": reference, "rows": rows}, markdown(rows, reference))
    print(markdown(rows, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
