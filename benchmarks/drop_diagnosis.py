"""Where layer dropping's loss comes from on SmolLM2-135M: the choice, or the missing compensation.

For each drop (default: 8 of 30 attention sublayers, 2 whole blocks), one row per choice
(``cosine``: one-shot residual-stream cosine scores, the old default; ``kl``: greedy, each round
re-scored by the KL of the dropped model's predictions on calibration tokens) and compensation
(``none``, ``bias``: the dropped unit's mean output, ``linear``: a ridge-regression map of its input),
all fitted on calib.txt only. Each row reports, against the float32 model, on the same windows
of eval.txt (DESIGN.md: non-overlapping 512-token windows, 128 = all of them):

- perplexity and its change;
- KL(p_float || p_dropped) of next-token distributions, mean per scored token;
- greedy-generation agreement: 10 prompts (32 tokens from the start of the first 10 windows) x 128
  new tokens, the fraction of generated tokens identical to the float model's
  (lqc.evaluate.agreement; generation through ``lqc.compress(..., target="eager")`` with its KV cache);
- the drop_layers pass's time (choice and fit), parameters removed and added back.

Perplexity and KL run the compressed graphs (captured on one 512-token window) window by window
beside the float model, so the reference logits are computed once per window for every row.

    python benchmarks/drop_diagnosis.py --windows 128 --out benchmarks/results/smollm2-drop-diagnosis
    python benchmarks/drop_diagnosis.py --windows 16 --drops attention:8 --choices kl --compensations none linear
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import lqc
from lqc.bench import write_results
from lqc.data import calibration_from, data_file, tokenize_file
from lqc.evaluate import agreement, eval_prompts, greedy_tokens, window_nll
from lqc.ir import trace
from lqc.ir.inputs import inputs_from_tokens, token_windows
from lqc.passes import PassContext, PassManager
from lqc.passes.numerics import run_graph

DROPS = ["attention:8", "block:2"]


def recipe_for(what: str, count: int, choice: str, compensation: str, extra: dict) -> list[dict]:
    entry = {"pass": "drop_layers", "what": what, "count": count, "choice": choice, "compensation": compensation}
    if "layers" in extra:  # a choice made before, given explicitly (count and layers exclude each other)
        entry.pop("count")
    return [{"pass": "cleanup"}, {**entry, **extra}]


def _row(spec: str) -> tuple:
    """what:count:choice:compensation[:key=json;key=json]"""
    what, count, choice, compensation, *rest = spec.split(":")
    options = dict(kv.split("=", 1) for kv in ":".join(rest).split(";")) if rest else {}
    return what, count, choice, compensation, {k: json.loads(v) for k, v in options.items()}


def build(model, recipe: list[dict], calibration, example: torch.Tensor):
    """(compressed graph, drop_layers record, seconds of the drop_layers pass)."""
    torch._dynamo.reset()
    graph = trace(model, example)
    report = PassManager(recipe).run(graph, PassContext(calibration=calibration, progress=False))
    record = next(r for r in report.records if r.name == "drop_layers")
    return graph, record, record.seconds


@torch.no_grad()
def evaluate(model, rows: list[dict], graphs: list, ids: torch.Tensor, windows: int) -> dict:
    """Float reference and each row's perplexity and KL, window by window."""
    chunks = token_windows(ids, 512, windows, what="eval.txt")
    ref_nll, nll, kl = 0.0, [0.0] * len(rows), [0.0] * len(rows)
    scored = 0
    start = time.perf_counter()
    for window in chunks:
        window = window[None]
        reference = model(input_ids=window, use_cache=False).logits
        ref_nll += window_nll(reference, window)
        ref_logp = torch.log_softmax(reference[0, :-1].float(), dim=-1)
        for k, graph in enumerate(graphs):
            logits = run_graph(graph, inputs_from_tokens(graph, window))[-1]
            nll[k] += window_nll(logits, window)
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            kl[k] += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum())
        scored += window.shape[1] - 1
    return {"reference": {"perplexity": math.exp(ref_nll / scored), "scored_tokens": scored, "windows": len(chunks),
                          "window_length": 512},
            "perplexity": [math.exp(v / scored) for v in nll], "kl": [v / scored for v in kl],
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def measure_agreement(model, tokenizer, calibration, rows: list[dict], prompts, new_tokens: int, save) -> None:
    """Each row's greedy generations against the float model's, through lqc.compress (eager target,
    KV cache); the choice and fit come from the transform cache the graphs above filled."""
    float_tokens = greedy_tokens(model, prompts, new_tokens)
    for row in rows:
        torch._dynamo.reset()
        compressed = lqc.compress(model, row["recipe"], calibration=calibration, tokenizer=tokenizer, target="eager",
                                  progress=False)
        record = next(r for r in lqc.session_of(compressed).reports[0].records if r.name == "drop_layers")
        if record.details.dropped != row["dropped"]:  # the choice is cached per model: this should not happen
            print(f"warning: the generating model dropped {record.details.dropped}, not {row['dropped']}", flush=True)
            row["agreement_dropped"] = record.details.dropped
        row["agreement"] = agreement(float_tokens, greedy_tokens(compressed, prompts, new_tokens)).agreement
        print(f"{row['what']} x{row['count']} {row['choice']}/{row['compensation']}: ppl {row['perplexity']:.4f} "
              f"({row['delta_pct']:+.2f}%), KL {row['kl']:.4f}, agreement {row['agreement']:.3f}", flush=True)
        save()


def markdown(payload: dict) -> str:
    ref = payload["reference"]
    out = [
        f"SmolLM2-135M, eval.txt: {ref['windows']} windows of 512 tokens ({ref['scored_tokens']:,} scored tokens); "
        f"float32 perplexity {ref['perplexity']:.4f}. KL: mean per token of KL(p_float || p_dropped). Agreement: "
        f"{payload['prompts']} prompts x {payload['new_tokens']} greedy tokens, fraction identical to the float model's. "
        f"Calibration: calib.txt only. Pass time: the drop_layers pass (choice and fit), {payload['threads']} threads.",
        "",
        "| drop | choice | compensation | blocks (in order chosen) | perplexity | vs float32 | KL | agreement | pass s "
        "| params removed | params added back |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        agree = f"{r['agreement']:.3f}" if r.get("agreement") is not None else "-"
        options = {k: v for k, v in r["recipe"][-1].items() if k not in ("pass", "what", "count", "choice", "compensation")}
        compensation = r["compensation"] + (f" ({', '.join(f'{k} {v}' for k, v in options.items())})" if options else "")
        out.append(f"| {r['what']} x{r['count']} | {r['choice']} | {compensation} | {r['order']} | {r['perplexity']:.4f} "
                   f"| {r['delta_pct']:+.2f}% | {r['kl']:.4f} | {agree} | {r['pass_seconds']:.0f} | "
                   f"{r['params_removed']:,} | {r['compensation_params']:,} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--drops", nargs="*", default=DROPS, help="what:count, e.g. attention:8 block:2")
    parser.add_argument("--choices", nargs="*", default=["cosine", "kl"], choices=["cosine", "kl"])
    parser.add_argument("--compensations", nargs="*", default=["none", "bias", "linear"])
    parser.add_argument("--rows", nargs="*", default=None,
                        help="explicit rows what:count:choice:compensation[:key=json;...] (instead of the grid)")
    parser.add_argument("--option", action="append", default=[], help="a drop_layers option for every row, KEY=JSON")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}

    loaded = lqc.models.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    calibration = calibration_from("calib", tokenizer)
    example = ids[None, :512]
    plan = [_row(r) for r in args.rows] if args.rows else [
        (*d.split(":"), choice, comp, {}) for d in args.drops for choice in args.choices for comp in args.compensations]

    rows, graphs = [], []
    for what, count, choice, compensation, options in plan:
        recipe = recipe_for(what, int(count), choice, compensation, {**extra, **options})
        graph, record, seconds = build(model, recipe, calibration, example)
        d = record.details
        rows.append({"what": what, "count": int(count), "choice": choice, "compensation": compensation, "recipe": recipe,
                     "dropped": d.dropped, "order": d.order, "pass_seconds": round(seconds, 1),
                     "params_removed": d.params_removed, "compensation_params": d.compensation_params, "scores": d.scores})
        graphs.append(graph)
        print(f"{what} x{count} {choice}/{compensation}: blocks {d.order}, pass {seconds:.0f}s", flush=True)
    quality = evaluate(model, rows, graphs, ids, args.windows)
    reference = quality["reference"]
    for k, row in enumerate(rows):
        row.update(perplexity=quality["perplexity"][k], kl=quality["kl"][k],
                   delta_pct=100 * (quality["perplexity"][k] / reference["perplexity"] - 1))
    print(f"float32 {reference['perplexity']:.4f}; evaluation {quality['seconds']:.0f}s", flush=True)
    del graphs

    meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads, "prompts": args.prompts,
            "new_tokens": args.new_tokens, "reference": reference, "eval_seconds": round(quality["seconds"], 1)}

    def save() -> None:  # after the evaluation and after every agreement row: a long run keeps what it measured
        if args.out:
            write_results(args.out, {**meta, "rows": rows}, markdown({**meta, "rows": rows}))

    for row in rows:
        row["agreement"] = None
    save()
    prompts = eval_prompts(ids, args.prompts) if args.prompts else []
    if prompts:
        measure_agreement(model, tokenizer, calibration, rows, prompts, args.new_tokens, save)
    save()
    table = markdown({**meta, "rows": rows})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
