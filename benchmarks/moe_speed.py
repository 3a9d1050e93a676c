"""Decode speed of SmolLM2-135M with its FFNs carved into experts (ffn_to_moe), against dense.

Variants, all through an lqc.Session backend with target auto (Inductor for the graph around the lqc
ops), ``dynamic=False``, static KV cache, batch 1, 2 threads (DESIGN.md's decode protocol, as
benchmarks/drop_speed.py):

- ``dense``: ``cleanup`` only;
- ``moe-P``: ``cleanup`` + ``ffn_to_moe`` (8 experts, 1 shared, top_k routed) with P% of FFN
  neurons active, one variant per ``--top-k``;
- ``int8`` and ``moe-P+int8`` (``--int8``): ``quantize`` int8 alone, and after the carve (expert
  weights and every other linear as int8 with per-row scales, one recipe).

Each variant decodes ``--decode`` tokens after a ``--prompt``-token prompt (random ids); timed
runs are interleaved across variants and the median is kept.

Expected speed-up: batch-1 decode reads every weight it uses and the cache once per token. A
carved FFN reads its router and the active fraction of its experts, so the expected ratio is
(weight bytes + cache bytes) of ``dense`` over (weight bytes - (1 - active fraction) x expert
bytes + cache bytes) of the variant. Expert bytes: float32, 4 bytes per FFN weight; int8, the
codes and scales the quantize report lists.

    python benchmarks/moe_speed.py --out benchmarks/results/smollm2-moe-speed
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import lqc
from lqc.bench import Runner, benchmark_calibration, write_results
from lqc.runtime.structural.dropped_layers import kv_cache_nbytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a name lqc.models.load knows (tiny-llama for a smoke run)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--top-k", type=int, nargs="*", default=[3], help="routed experts per token (3 of 8 with 1 shared: 50%%)")
    parser.add_argument("--int8", action="store_true", help="also time each carve with int8 weights")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = lqc.models.load(args.model)
    model, config = loaded.model, loaded.model.config
    calibration = benchmark_calibration(loaded)

    recipes = {"dense": [{"pass": "cleanup"}]}
    for top_k in args.top_k:
        percent = round(100 * (args.shared + top_k) / args.experts)
        carve = [{"pass": "cleanup"}, {"pass": "ffn_to_moe", "experts": args.experts, "shared": args.shared, "top_k": top_k}]
        recipes[f"moe-{percent}"] = carve
        if args.int8:
            recipes.setdefault("int8", [{"pass": "cleanup"}, {"pass": "quantize", "format": "int8"}])
            recipes[f"moe-{percent}+int8"] = carve + [{"pass": "quantize", "format": "int8"}]

    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    cache_length = args.prompt + args.decode
    runners, info = {}, {}
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for name, recipe in recipes.items():
            print(f"compiling and warming up {name} ...", flush=True)
            session = lqc.Session({"recipe": recipe, "target": "auto", "progress": False, "calibration": calibration})
            runner = Runner(model, torch.compile(model.forward, backend=session, dynamic=False))
            _, _, cache = runner.decode(prompt, min(3, args.decode), cache_length)
            done = [r for r in session.reports if not r.fallback]
            records = {rec.name: rec for rec in done[-1].records if rec.stage == "recipe"}
            carve, quantize = records.get("ffn_to_moe"), records.get("quantize")
            expert_bytes = active = None
            if carve is not None:
                active = carve.details.active_fraction
                expert_bytes = carve.details.ffn_flops_per_token_dense // 2 * 4  # 2 FLOPs per float32 weight
                if quantize is not None:
                    expert_bytes = sum(row.bytes_after for row in quantize.details.layers if row.kind == "experts")
            runners[name] = runner
            info[name] = {"weight_bytes": done[-1].bytes_after, "kv_cache_bytes": kv_cache_nbytes(cache),
                          "expert_bytes": expert_bytes, "active_fraction": active}
        times = {name: [] for name in runners}
        for run in range(args.runs):
            print(f"timed run {run + 1}/{args.runs} ...", flush=True)
            for name, runner in runners.items():
                times[name].append(runner.decode(prompt, args.decode, cache_length)[1])

    dense_tps = args.decode / statistics.median(times["dense"])
    dense_read = info["dense"]["weight_bytes"] + info["dense"]["kv_cache_bytes"]
    rows = []
    for name, recipe in recipes.items():
        i = info[name]
        read = i["weight_bytes"] + i["kv_cache_bytes"]
        if i["expert_bytes"] is not None:
            read -= (1 - i["active_fraction"]) * i["expert_bytes"]
        tps = args.decode / statistics.median(times[name])
        rows.append({"variant": name, "recipe": recipe, "decode_tokens_per_s": tps,
                     "runs_tokens_per_s": [args.decode / t for t in times[name]], "speedup_measured": tps / dense_tps,
                     "speedup_expected": dense_read / read, "bytes_read_per_token": read, **i})
        print(f"{name}: {tps:.2f} tok/s ({rows[-1]['speedup_measured']:.3f}x measured, {rows[-1]['speedup_expected']:.3f}x expected)",
              flush=True)

    lines = [f"{loaded.name} float32, decode of {args.decode} tokens after a {args.prompt}-token prompt, static cache, median of "
             f"{args.runs} interleaved runs, {args.threads} threads, torch {torch.__version__}, backend lqc, target auto. "
             f"{args.experts} experts per FFN, {args.shared} shared.", "",
             "| variant | decode tok/s | speed-up measured | speed-up expected | weight MB stored | MB read per token |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['decode_tokens_per_s']:.2f} | {row['speedup_measured']:.3f}x | "
                     f"{row['speedup_expected']:.3f}x | {row['weight_bytes'] / 1e6:.1f} | {row['bytes_read_per_token'] / 1e6:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads, "prompt": args.prompt,
                "decode": args.decode, "runs": args.runs, "experts": args.experts, "shared": args.shared}
        write_results(args.out, {**meta, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
