"""FFN-to-MoE on SmolLM2-135M: perplexity and FFN FLOPs per token at several active fractions,
the clustered partition against a random one with the same (least-squares) router.

Every row carves every FFN into ``--experts`` experts with ``--shared`` shared ones; ``top_k``
sets the active fraction (shared + top_k) / experts. With ``--int8`` each clustered carve is also
measured followed by ``quantize`` int8 (experts and every other linear: one recipe). Perplexity follows DESIGN.md's protocol
(non-overlapping 512-token windows of eval.txt, float32; full = 128 windows); calibration is
calib.txt. Rows are written after each measurement.

    python benchmarks/moe_quality.py --windows 128 --out benchmarks/results/smollm2-moe-quality
    python benchmarks/moe_quality.py --windows 16 --top-k 3        # a quick look at 50% active
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import lqc
from lqc.bench import write_results
from lqc.data import calibration_from, data_file, tokenize_file
from lqc.evaluate import causal_lm_logits, perplexity


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--top-k", type=int, nargs="*", default=[5, 3, 1], help="routed experts per token (default: 75/50/25%% active)")
    parser.add_argument("--partitions", nargs="*", default=["cluster", "random"], choices=["cluster", "random"])
    parser.add_argument("--int8", action="store_true", help="also measure each clustered carve with int8 weights")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = lqc.models.load(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    calibration = calibration_from("calib", tokenizer)
    rows = []
    with torch.no_grad():
        reference = perplexity(causal_lm_logits(model), ids, max_windows=args.windows, progress=False).to_json()
        print(f"dense float32: {reference['perplexity']:.4f} ({reference['scored_tokens']} tokens)", flush=True)
        runs = [(k, p, False) for k in args.top_k for p in args.partitions]
        runs += [(k, "cluster", True) for k in args.top_k if args.int8]
        for top_k, partition, int8 in runs:
            recipe = [{"pass": "cleanup"}, {"pass": "ffn_to_moe", "experts": args.experts, "shared": args.shared,
                                            "top_k": top_k, "partition": partition, "tokens": args.tokens}]
            recipe += [{"pass": "quantize", "format": "int8"}] if int8 else []
            torch._dynamo.reset()
            start = time.perf_counter()
            compressed = lqc.compress(model, recipe, calibration=calibration, tokenizer=tokenizer, progress=False)
            seconds = time.perf_counter() - start
            report = lqc.session_of(compressed).reports[-1]
            record = next(r for r in report.records if r.name == "ffn_to_moe")
            result = perplexity(causal_lm_logits(compressed), ids, max_windows=args.windows, progress=False)
            layers = record.details.layers
            row = {
                "top_k": top_k, "partition": partition, "int8": int8, "weight_bytes": report.bytes_after,
                "active_fraction": record.details.active_fraction,
                "perplexity": result.perplexity, "delta_pct": 100 * (result.perplexity / reference["perplexity"] - 1),
                "ffn_flops_per_token_dense": record.details.ffn_flops_per_token_dense,
                "ffn_flops_per_token_moe": record.details.ffn_flops_per_token_moe,
                "router_recall_mean": sum(layer["router_recall"] for layer in layers) / len(layers),
                "router_recall_initial_mean": sum(layer["router_recall_initial"] for layer in layers) / len(layers),
                "compress_seconds": round(seconds, 1), "eval_seconds": round(result.seconds, 1), "recipe": recipe,
            }
            rows.append(row)
            print(f"{row['active_fraction']:.0%} active, {partition}{' + int8' if int8 else ''}: {row['perplexity']:.4f} ({row['delta_pct']:+.2f}%), "
                  f"FFN FLOPs/token {row['ffn_flops_per_token_moe']:,} of {row['ffn_flops_per_token_dense']:,}, "
                  f"router recall {row['router_recall_mean']:.3f} (initial {row['router_recall_initial_mean']:.3f})", flush=True)
            if args.out:
                meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads, "experts": args.experts,
                        "shared": args.shared}
                write_results(args.out, {**meta, "reference": reference, "rows": rows}, markdown(rows, reference, args))
    print(markdown(rows, reference, args))
    return 0


def markdown(rows, reference, args) -> str:
    lines = [f"Perplexity on eval.txt, {reference['windows']} windows of {reference['window_length']} tokens; dense float32 "
             f"{reference['perplexity']:.4f}. {args.experts} experts per FFN, {args.shared} shared; least-squares router.", "",
             "| active | partition | weights | perplexity | vs dense | FFN FLOPs/token | of dense | weight MB | router recall (initial) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['active_fraction']:.0%} | {r['partition']} | {'int8' if r['int8'] else 'float32'} | {r['perplexity']:.4f} | "
                     f"{r['delta_pct']:+.2f}% | {r['ffn_flops_per_token_moe']:,} | "
                     f"{r['ffn_flops_per_token_moe'] / r['ffn_flops_per_token_dense']:.3f} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['router_recall_mean']:.3f} ({r['router_recall_initial_mean']:.3f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
