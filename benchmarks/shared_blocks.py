"""Inductor a block at a time (``share_blocks``, the default) against the whole graph at once.

1. Cold compile, each way in its own process with every cache empty (Inductor's and g++'s
   kernels included, so neither finds the other's work): the prefill graph (512 tokens into a
   static cache) and the decode graph (one token), dynamo's tracing and lqc's passes included.
2. Speed and numerics, both ways compiled in this process (their caches now warm), timed
   interleaved: a 512-token prefill and decode steps after it; logits of the prefill and of the
   last step against lqc's eager target (the same compressed graph run op by op).

    python benchmarks/shared_blocks.py --recipe default --out benchmarks/results/shared-blocks-smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lqc


def _forward(model, recipe: str, share_blocks: bool, target: str = "inductor"):
    session = lqc.Session({"recipe": recipe, "target": target, "share_blocks": share_blocks, "progress": False})
    return torch.compile(model.forward, backend=session, dynamic=False)


def _new_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _prefill_then_steps(forward, model, ids, steps: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    cache = _new_cache(model, ids.shape[1] + steps + 1)
    with torch.no_grad():
        start = time.perf_counter()
        prefill = forward(input_ids=ids, cache=cache, use_cache=True).logits
        prefill_s = time.perf_counter() - start
        token = prefill[:, -1:].argmax(-1)
        start = time.perf_counter()
        for i in range(steps):
            step = forward(input_ids=token, cache=cache, use_cache=True,
                           position_ids=torch.tensor([[ids.shape[1] + i]])).logits
        step_s = (time.perf_counter() - start) / steps
    return prefill_s, step_s, prefill, step


def cold_compile(args) -> dict:
    """One way, in this (fresh) process: the first prefill and the first decode step, minus a steady one."""
    model = lqc.models.load(args.model).model
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    forward = _forward(model, args.recipe, args.one == "shared")
    first = _prefill_then_steps(forward, model, ids, 1)
    steady = _prefill_then_steps(forward, model, ids, 1)
    # each graph's program (the CompiledGraph's fn): a SharedBlockProgram counts the pieces it compiled
    programs = [getattr(c.fn.fn, "compiled", None) for c in lqc.session_of(forward).compilations if not c.fallback]
    return {"prefill_s": first[0] - steady[0], "decode_s": first[1] - steady[1], "compiled_pieces": programs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=["shared", "whole"], help=argparse.SUPPRESS)  # a cold-compile child
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(cold_compile(args)))
        return

    cold = {}
    for way in ("whole", "shared"):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": folder}
            env.pop("LQC_CACHE_DIR", None)
            print(f"cold compile, {way} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", way, "--model", args.model, "--recipe", args.recipe,
                                  "--tokens", str(args.tokens), "--threads", str(args.threads)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            cold[way] = json.loads(out.strip().splitlines()[-1])

    model = lqc.models.load(args.model).model
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ways = {"whole": _forward(model, args.recipe, False), "shared": _forward(model, args.recipe, True)}
    _, _, want_prefill, want_step = _prefill_then_steps(_forward(model, args.recipe, True, "eager"), model, ids, args.steps)
    timed = {way: {"prefill_s": [], "step_s": []} for way in ways}
    errors = {}
    for way, forward in ways.items():  # compiles from warm caches, not timed
        _, _, prefill, step = _prefill_then_steps(forward, model, ids, args.steps)
        errors[way] = {"prefill": (prefill - want_prefill).abs().max().item(), "step": (step - want_step).abs().max().item()}
    for _ in range(args.runs):
        for way, forward in ways.items():
            prefill_s, step_s, _, _ = _prefill_then_steps(forward, model, ids, args.steps)
            timed[way]["prefill_s"].append(prefill_s)
            timed[way]["step_s"].append(step_s)

    rows = []
    for way in ways:
        rows.append({
            "way": way, "cold_prefill_graph_s": cold[way]["prefill_s"], "cold_decode_graph_s": cold[way]["decode_s"],
            "compiled_pieces": cold[way]["compiled_pieces"],
            "prefill_tok_s": args.tokens / statistics.median(timed[way]["prefill_s"]),
            "decode_tok_s": 1 / statistics.median(timed[way]["step_s"]),
            "max_abs_vs_eager_prefill": errors[way]["prefill"], "max_abs_vs_eager_step": errors[way]["step"],
        })
    head = (f"{args.model}, recipe {args.recipe}, target inductor, {args.tokens}-token prefill into a static cache, "
            f"{args.steps} decode steps, median of {args.runs} interleaved runs, {args.threads} threads, torch {torch.__version__}")
    lines = [head, "", "| way | cold compile: prefill graph s | decode graph s | prefill tok/s | decode tok/s | "
             "max abs diff vs eager: prefill logits | last step |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['way']} | {r['cold_prefill_graph_s']:.1f} | {r['cold_decode_graph_s']:.1f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['max_abs_vs_eager_prefill']:.3g} | {r['max_abs_vs_eager_step']:.3g} |")
    whole, shared = rows
    lines += ["", f"shared / whole: cold compile {(shared['cold_prefill_graph_s'] + shared['cold_decode_graph_s']) / (whole['cold_prefill_graph_s'] + whole['cold_decode_graph_s']):.2f}x, "
              f"decode {shared['decode_tok_s'] / whole['decode_tok_s']:.3f}x, prefill {shared['prefill_tok_s'] / whole['prefill_tok_s']:.3f}x"]
    print("\n".join(lines))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps({"setup": head, "rows": rows, "timed": timed, "cold": cold}, indent=1))
        path.with_suffix(".md").write_text("# Inductor a block at a time vs the whole graph\n\n"
                                           "`python benchmarks/shared_blocks.py --recipe " + args.recipe + "`\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
