"""merge_adapters on the tiny Llama with LoRA, DoRA, Bone and bat adapters: graph size and latency.

The model is ``tests/adapters.py``'s ``MIXED_PLAN``: seven adapted linears of the 2-layer random
Llama (hidden 64). Variants, all compiled with ``dynamic=False``:

- ``eager``: the adapted model, not compiled;
- ``lqc-adapters``: an lqc.Session backend, empty recipe, target inductor: the adapters compiled as they are;
- ``lqc-merged``: an lqc.Session backend, recipe ``[merge_adapters]``, target inductor.

Per variant: nodes of the lqc graph (at capture, after the recipe), relative error of the logits
against eager, and the forward latency of a [1, T] prompt for each T in ``--tokens`` (no cache passed in):
the median over ``--runs`` runs of the mean of ``--calls`` calls, after warm-up, variants
interleaved run by run so drift hits all of them alike, 1 thread.

    python benchmarks/merge_adapters.py --out benchmarks/results/merge-adapters
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.adapters

import lqc  # noqa: E402
from lqc.passes.numerics import compare_outputs  # noqa: E402
from tests.adapters import MIXED_PLAN, wrap  # noqa: E402

RECIPES = {"lqc-adapters": [], "lqc-merged": [{"pass": "merge_adapters"}]}


def build(model: torch.nn.Module) -> tuple[dict, dict]:
    """name -> forward, and name -> the lqc.Session of each compiled variant."""
    variants, sessions = {"eager": model.forward}, {}
    for name, recipe in RECIPES.items():
        session = lqc.Session({"recipe": recipe, "target": "inductor", "progress": False})
        variants[name] = torch.compile(model.forward, backend=session, dynamic=False)
        sessions[name] = session
    return variants, sessions


@torch.no_grad()
def time_calls(forward, ids: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        forward(ids)
    return (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model = wrap(lqc.models.load("tiny-llama").model, MIXED_PLAN)
    variants, sessions = build(model)
    gen = torch.Generator().manual_seed(0)
    inputs = {t: torch.randint(0, model.config.vocab_size, (1, t), generator=gen) for t in args.tokens}

    rows = {name: {"variant": name} for name in variants}
    with torch.no_grad():
        for tokens, ids in inputs.items():
            eager = model(ids).logits
            for name, forward in variants.items():
                if name == "eager":
                    continue
                count = len(sessions[name].compilations)
                logits = forward(ids).logits  # compiles this shape
                report = sessions[name].reports[count]
                assert not report.fallback, f"{name}: fell back to Inductor: {report.fallback}"
                recipe_records = [r for r in report.records if r.stage == "recipe"]  # lowering passes follow them
                rows[name].setdefault("nodes_captured", report.capture_nodes)
                rows[name].setdefault("nodes_after", recipe_records[-1].nodes_after if recipe_records else report.capture_nodes)
                if recipe_records:
                    rows[name].setdefault("merged", sorted(recipe_records[-1].details.merged))
                rows[name][f"rel_error_T{tokens}"] = compare_outputs([logits], [eager])[0]

        for forward in variants.values():  # warm-up
            for ids in inputs.values():
                time_calls(forward, ids, 10)
        times = {(name, t): [] for name in variants for t in inputs}
        for run in range(args.runs):
            for tokens, ids in inputs.items():
                for name, forward in variants.items():
                    times[name, tokens].append(time_calls(forward, ids, args.calls))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    for (name, tokens), samples in times.items():
        rows[name][f"latency_us_T{tokens}"] = statistics.median(samples) * 1e6
        rows[name][f"latency_runs_us_T{tokens}"] = [s * 1e6 for s in samples]

    header = ["variant", "nodes (capture -> recipe)", "rel err vs eager"] + [f"latency T={t} (us)" for t in inputs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        nodes = f"{row['nodes_captured']} -> {row['nodes_after']}" if "nodes_captured" in row else "-"
        errors = [row.get(f"rel_error_T{t}") for t in inputs]
        error = f"{max(errors):.1e}" if all(e is not None for e in errors) else "-"
        latencies = [f"{row[f'latency_us_T{t}']:.0f}" for t in inputs]
        lines.append("| " + " | ".join([name, nodes, error, *latencies]) + " |")
    merged = rows["lqc-merged"].get("merged", [])
    meta = {
        "model": "tiny-llama + MIXED_PLAN adapters",
        "adapters": {pattern: list(spec) for pattern, spec in MIXED_PLAN.items()},
        "threads": 1,
        "runs": args.runs,
        "calls_per_run": args.calls,
        "torch_version": torch.__version__,
    }
    intro = (
        f"tiny-llama with {len(MIXED_PLAN)} adapters (LoRA, DoRA, Bone, bat; tests/adapters.py MIXED_PLAN); "
        f"forward of a [1, T] prompt (no cache passed in), median of {args.runs} runs x {args.calls} calls, 1 thread, "
        f"torch {torch.__version__}. Merged: {', '.join(merged)}.\n\n"
    )
    table = intro + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
