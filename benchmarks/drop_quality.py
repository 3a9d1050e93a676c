"""Layer dropping on SmolLM2-135M: the calibration-scored choice against random choices.

For each kind (attention sublayers, whole blocks) and each count N, one row per choice:
the scored choice of ``drop_layers`` (``choice: cosine``: one-shot scores on 4,096 calibration tokens of calib.txt;
``--iterative`` adds the re-scored variant) and ``--random`` random choices of N of the 30
blocks (seeded: choice r of count N uses seed 1000 * N + r, so reruns draw the same layers),
each given to ``drop_layers`` as an explicit list. Perplexity follows DESIGN.md's protocol
(non-overlapping 512-token windows of eval.txt, float32; full = 128 windows). Rows are written
after each measurement; ``--resume`` keeps those already in OUT.json.

    python benchmarks/drop_quality.py --windows 128 --out benchmarks/results/smollm2-drop-quality
    python benchmarks/drop_quality.py --windows 16 --what attention --counts 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import lqc
from lqc.bench import write_results
from lqc.data import calibration_from, data_file, tokenize_file
from lqc.evaluate import causal_lm_logits, perplexity

DEFAULT_COUNTS = {"attention": [2, 4, 8], "block": [1, 2, 4]}


def random_layers(total: int, count: int, draw: int) -> list[int]:
    generator = torch.Generator().manual_seed(1000 * count + draw)
    return sorted(torch.randperm(total, generator=generator)[:count].tolist())


def drop_recipe(what: str, **choice) -> list[dict]:
    return [{"pass": "cleanup"}, {"pass": "drop_layers", "what": what, **choice}]


def measure(model, tokenizer, recipe, calibration, ids, windows) -> dict:
    torch._dynamo.reset()  # every row compiles the same forward: start from an empty dynamo cache
    start = time.perf_counter()
    compressed = lqc.compress(model, recipe, calibration=calibration, tokenizer=tokenizer, progress=False)
    seconds = time.perf_counter() - start
    record = next(r for r in lqc.session_of(compressed).reports[-1].records if r.name == "drop_layers")
    result = perplexity(causal_lm_logits(compressed), ids, max_windows=windows, progress=False)
    details = record.details
    return {
        "dropped": details.dropped, "perplexity": result.perplexity, "scored_tokens": result.scored_tokens,
        "params_removed": details.params_removed, "flops_per_token_removed": details.flops_per_token_removed,
        "compress_seconds": round(seconds, 1), "eval_seconds": round(result.seconds, 1),
        "scores": details.scores[0]["blocks"] if details.scores else None,
    }


def summary(rows: list[dict], reference: dict) -> list[dict]:
    """One line per (what, count): the scored choice(s) against the random mean."""
    lines = []
    keys = sorted({(r["what"], r["count"]) for r in rows}, key=lambda k: (k[0] != "attention", k[1]))
    for what, count in keys:
        group = [r for r in rows if r["what"] == what and r["count"] == count]
        random_rows = [r for r in group if r["choice"].startswith("random")]
        for scored in (r for r in group if not r["choice"].startswith("random")):
            line = {"what": what, "count": count, "choice": scored["choice"], "dropped": scored["dropped"],
                    "perplexity": scored["perplexity"], "delta_pct": scored["delta_pct"], "random": len(random_rows)}
            if random_rows:
                perplexities = [r["perplexity"] for r in random_rows]
                mean = statistics.fmean(perplexities)
                median = statistics.median(perplexities)
                line.update(random_mean=mean, random_mean_delta_pct=100 * (mean / reference["perplexity"] - 1),
                            random_median=median, random_median_delta_pct=100 * (median / reference["perplexity"] - 1),
                            random_min=min(perplexities), random_max=max(perplexities),
                            beats_random_mean=scored["perplexity"] < mean,
                            random_better=sum(p < scored["perplexity"] for p in perplexities))
            lines.append(line)
    return lines


def markdown(rows: list[dict], reference: dict) -> str:
    out = [
        f"Perplexity on eval.txt, {reference['windows']} windows of {reference['window_length']} tokens "
        f"({reference['scored_tokens']:,} scored tokens). float32, nothing dropped: {reference['perplexity']:.4f}.",
        "",
        "| drop | N | choice | blocks | perplexity | vs float32 | mean of random | median of random | random range "
        "| scored beats random mean | random draws better than scored |",
        "|---|---:|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for line in summary(rows, reference):
        if "random_mean" in line:
            random_cells = (f"{line['random_mean']:.2f} ({line['random_mean_delta_pct']:+.1f}%, {line['random']} draws) | "
                            f"{line['random_median']:.2f} ({line['random_median_delta_pct']:+.1f}%) | "
                            f"{line['random_min']:.2f} .. {line['random_max']:.2f} | {'yes' if line['beats_random_mean'] else 'NO'} | "
                            f"{line['random_better']} of {line['random']}")
        else:
            random_cells = "| | | | "
        out.append(f"| {line['what']} | {line['count']} | {line['choice']} | {line['dropped']} | {line['perplexity']:.4f} | "
                   f"{line['delta_pct']:+.2f}% | {random_cells} |")
    out += ["", "Every row:", "", "| drop | N | choice | blocks | perplexity | vs float32 | parameters removed | FLOPs/token removed |",
            "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['what']} | {r['count']} | {r['choice']} | {r['dropped']} | {r['perplexity']:.4f} | {r['delta_pct']:+.2f}% | "
                   f"{r['params_removed']:,} | {r['flops_per_token_removed']:,} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--what", nargs="*", default=list(DEFAULT_COUNTS), choices=list(DEFAULT_COUNTS))
    parser.add_argument("--counts", nargs="*", type=int, default=None, help="counts to measure (default: 2 4 8 attention, 1 2 4 blocks)")
    parser.add_argument("--random", type=int, default=5, help="random choices per count")
    parser.add_argument("--iterative", action="store_true", help="also measure the iterative (re-scored) choice")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep OUT.json's rows (same windows) and measure the rest")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = lqc.models.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    total = model.config.num_hidden_layers
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    calibration = calibration_from("calib", tokenizer)
    previous = json.loads(Path(args.out).with_suffix(".json").read_text()) if args.resume and args.out else None
    if previous and previous["reference"]["windows"] != args.windows:
        parser.error(f"--resume: {args.out}.json has {previous['reference']['windows']} windows, not {args.windows}")

    plan = []  # (what, count, choice name, drop_layers options)
    for what in args.what:
        for count in args.counts or DEFAULT_COUNTS[what]:
            # the one-shot cosine scores, as measured here before choice: kl became drop_layers' default
            # (benchmarks/drop_diagnosis.py compares the two)
            plan.append((what, count, "scored", {"count": count, "choice": "cosine"}))
            if args.iterative:
                plan.append((what, count, "scored-iterative", {"count": count, "choice": "cosine", "iterative": True}))
            plan += [(what, count, f"random-{r}", {"layers": random_layers(total, count, r)}) for r in range(args.random)]

    with torch.no_grad():
        if previous:
            reference, rows = previous["reference"], previous["rows"]
        else:
            reference = perplexity(causal_lm_logits(model), ids, max_windows=args.windows, progress=False).to_json()
            rows = []
        print(f"float32: {reference['perplexity']:.4f} ({reference['scored_tokens']} tokens, {reference['seconds']:.0f}s)", flush=True)
        done = {(r["what"], r["count"], r["choice"]) for r in rows}
        for what, count, choice, options in plan:
            if (what, count, choice) in done:
                continue
            recipe = drop_recipe(what, **options)
            row = {"what": what, "count": count, "choice": choice, "recipe": recipe,
                   **measure(model, tokenizer, recipe, calibration, ids, args.windows)}
            assert row.pop("scored_tokens") == reference["scored_tokens"]
            row["delta_pct"] = 100 * (row["perplexity"] / reference["perplexity"] - 1)
            rows.append(row)
            print(f"{what} x{count} {choice} {row['dropped']}: {row['perplexity']:.4f} ({row['delta_pct']:+.2f}%), "
                  f"{row['eval_seconds']:.0f}s eval", flush=True)
            if args.out:  # written after every row: a long run keeps what it measured
                meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads}
                payload = {**meta, "reference": reference, "summary": summary(rows, reference), "rows": rows}
                write_results(args.out, payload, markdown(rows, reference))
    if args.out:  # also after a --resume that measured nothing new: the tables follow the code
        meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads}
        write_results(args.out, {**meta, "reference": reference, "summary": summary(rows, reference), "rows": rows},
                      markdown(rows, reference))
    print(markdown(rows, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
