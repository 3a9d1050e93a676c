"""lqc auto on SmolLM2-135M at several size budgets: the recipe each search writes, compiled, its
stored bytes and its perplexity on all of eval.txt, beside the uniform named recipes.

One process: the levels (GPTQ int4 g64 / g128, EoRA, int8) and the per-layer sensitivities are
computed once and shared by every budget's search (the transform cache and ``sensitivity``; a
later run takes the sensitivities from an earlier run's state and keeps its rows of other sizes).
Each budget's search state is kept under OUT-state/ so an interrupted run resumes. Perplexity uses the
reference qlinear math (``kernels: false`` added to each quantize entry: float32 matmuls on the
dequantized weights, as benchmarks/quant_quality.py measures the uniform formats), so the table
compares compression error alone; the recipes as written run torch's packed bf16 kernels.

    python benchmarks/auto_pareto.py --sizes 0.17 0.20 0.25 --generations 12 --out benchmarks/results/smollm2-auto-pareto
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import yaml

import lqc
from lqc.auto import DEFAULT_LEVELS, auto_recipe, held_out_kl
from lqc.bench import write_results
from lqc.data import calibration_from, data_file, tokenize_file
from lqc.evaluate import causal_lm_logits, perplexity

# uniform named recipes, measured on the same 128 windows by earlier committed runs (whole-model bytes)
UNIFORM = [
    {"recipe": "int8 (linears)", "bytes_x": 0.30, "delta_pct": 0.16, "source": "smollm2-quant-quality.md (lqc-int8), issue 26's 163 MB"},
    {"recipe": "default (int8 + int8 table)", "bytes_x": 135.2 / 538.1, "delta_pct": 0.44, "source": "smollm2-recipe-candidates.md (int8-all)"},
    {"recipe": "int4-gptq (g64, table float)", "bytes_x": (59.7 + 113.3) / 538.1, "delta_pct": 3.71, "source": "smollm2-quant-quality-int4-g64.md"},
    {"recipe": "max (g64 GPTQ + int8 table)", "bytes_x": 88.5 / 538.1, "delta_pct": 4.47, "source": "smollm2-recipe-candidates.md"},
]


def measured(model, recipe: dict, calibration, ids, windows: int, held_out: list[torch.Tensor]) -> dict:
    """The recipe compiled once: stored bytes, perplexity on eval.txt, KL on held-out calibration windows."""
    passes = [{**e, "kernels": False} if e["pass"] == "quantize" else e for e in copy.deepcopy(recipe["passes"])]
    torch._dynamo.reset()
    compressed = lqc.compress(model, passes, calibration=calibration, target="eager", progress=False)
    records = [r for r in lqc.session_of(compressed).reports[-1].records if r.stage == "recipe"]
    result = perplexity(causal_lm_logits(compressed), ids, max_windows=windows, progress=False)
    return {"perplexity": result.perplexity, "scored_tokens": result.scored_tokens, "bytes": records[-1].bytes_after,
            "held_out_kl": held_out_kl(model, compressed, held_out)}


def markdown(reference: dict, rows: list[dict], float_bytes: int) -> str:
    lines = [f"SmolLM2-135M, eval.txt: {reference['windows']} windows of 512 tokens ({reference['scored_tokens']:,} scored), "
             f"float32 perplexity {reference['perplexity']:.4f}, {float_bytes / 1e6:.1f} MB. Bytes: every weight as stored "
             "(embedding/lm_head, norms, EoRA factors included). Search: KL on calib.txt only.",
             "", "| recipe | bytes / float32 | MB | perplexity | vs float32 | search KL | held-out KL | search s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| auto --size {row['size']} | {row['bytes'] / float_bytes:.3f} | {row['bytes'] / 1e6:.1f} | {row['perplexity']:.4f} | "
                     f"{row['delta_pct']:+.2f}% | {row['search_kl']:.4f} | {row['verified_kl']:.4f} | {row['seconds']:.0f} |")
    for u in UNIFORM:
        ppl = reference["perplexity"] * (1 + u["delta_pct"] / 100)
        lines.append(f"| {u['recipe']} (committed: {u['source']}) | {u['bytes_x']:.3f} | {u['bytes_x'] * float_bytes / 1e6:.1f} | "
                     f"{ppl:.4f} | {u['delta_pct']:+.2f}% | - | - | - |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.17, 0.20, 0.25])
    parser.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS))
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/smollm2-auto-pareto")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = lqc.models.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    calibration = calibration_from("calib", tokenizer)
    states = Path(f"{args.out}-state")
    states.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        committed = Path("benchmarks/results/smollm2-quant-quality.json")  # the same windows' float32 figure
        previous = json.loads(committed.read_text())["reference"] if committed.is_file() else None
        if previous and previous["windows"] == args.windows:
            reference = previous
        else:
            reference = perplexity(causal_lm_logits(model), ids, max_windows=args.windows, progress=False).to_json()
        print(f"float32: {reference['perplexity']:.4f}", flush=True)
        previous_rows = json.loads(Path(f"{args.out}.json").read_text())["rows"] if Path(f"{args.out}.json").is_file() else []
        rows = [r for r in previous_rows if r["size"] not in args.sizes]  # rows of other sizes are kept
        # the per-layer sensitivities do not depend on the budget: an earlier run's state gives them
        sensitivity = next((json.loads(f.read_text())["sensitivity"] for f in sorted(states.glob("size-*.json"))), None)
        for size in args.sizes:
            started = time.perf_counter()
            # verify=False: the recipe is compiled once below, for its bytes, perplexity and held-out KL
            result = auto_recipe(model, calibration, size=size, levels=args.levels, generations=args.generations,
                                 state_path=states / f"size-{size}.json", sensitivity=sensitivity, verify=False)
            seconds = time.perf_counter() - started
            sensitivity = result.state.sensitivity
            (states / f"size-{size}.yaml").write_text(yaml.safe_dump(result.recipe, sort_keys=False, width=120))
            m = measured(model, result.recipe, calibration, ids, args.windows, calibration.windows(1, 512, 20)[16:])
            rows = [r for r in rows if r["size"] != size] + [{"size": size, **m, "delta_pct": 100 * (m["perplexity"] / reference["perplexity"] - 1),
                         "search_bytes": result.bytes, "search_kl": result.search_kl, "verified_kl": m["held_out_kl"],
                         "seconds": seconds, "levels": dict(sorted(_counts(result.config).items())), "recipe": result.recipe}]
            rows.sort(key=lambda r: r["size"])
            row = next(r for r in rows if r["size"] == size)
            print(f"size {size}: {m['bytes'] / result.float_bytes:.3f}x, ppl {m['perplexity']:.4f} "
                  f"({row['delta_pct']:+.2f}%), search {seconds:.0f}s, levels {row['levels']}", flush=True)
            payload = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads, "reference": reference,
                       "float_bytes": result.float_bytes, "rows": rows, "uniform": UNIFORM, "levels": args.levels}
            write_results(args.out, payload, markdown(reference, rows, result.float_bytes))
    print(Path(f"{args.out}.md").read_text())
    return 0


def _counts(config: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for level in config.values():
        counts[level] = counts.get(level, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
