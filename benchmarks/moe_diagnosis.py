"""Where FFN->MoE's loss comes from on SmolLM2-135M: the partition into experts, or the routing.

Oracles, on the float model with each FFN patched (no pass involved), at 50% of FFN neurons:

- ``oracle neurons``: per token, the 50% of neurons with the largest |down input| x ||down column||
  (no partition at all: experts of one neuron, perfect routing);
- ``oracle experts E``: the neurons cut into E equal groups (by index: no clustering), per token
  the best half of the groups by the true norm of each group's output (perfect routing of a fixed
  partition), at E = 8, 32, 64;

then routers that can run, neuron by neuron:

- ``gate router``: the 50% of neurons with the largest |act(gate)| (the gate projection as router);
- ``gate router, weighted``: |act(gate)| x mean|up| x ||down column|| (route_neurons' score);
- ``gate 75%, then oracle 50%``: the weighted gate keeps 75%, then the oracle's score picks 50% of
  all neurons among those (what computing up for 75% of the neurons would buy);

and the passes themselves (trace + PassManager, calibrated on calib.txt only):

- ``ffn_to_moe`` 8 experts, 1 shared, top 3 (the old ``moe`` recipe);
- ``route_neurons`` at 50% and 75% active (with the skipped-neuron bias).

Each row, against the float32 model on the same windows of eval.txt (DESIGN.md: non-overlapping
512-token windows, 128 = all): perplexity, KL(p_float || p_row) mean per scored token, and greedy
agreement (10 prompts of 32 tokens x 128 new tokens, fraction identical to the float model's).

    python benchmarks/moe_diagnosis.py --windows 128 --out benchmarks/results/smollm2-moe-diagnosis
    python benchmarks/moe_diagnosis.py --windows 128 --rows "int4 g64" "route_neurons 50% + int4 g64" \
        --out benchmarks/results/smollm2-moe-composition
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types

import torch
import torch.nn.functional as F

import lqc
from lqc.bench import write_results
from lqc.data import calibration_from, data_file, tokenize_file
from lqc.evaluate import agreement, eval_prompts, greedy_tokens, window_nll
from lqc.ir import trace
from lqc.ir.inputs import inputs_from_tokens, token_windows
from lqc.passes import PassContext, PassManager
from lqc.passes.numerics import run_graph
from lqc.runtime.structural.neuron_routing import keep_top_neurons_reference

ORACLES = [("oracle neurons", "neurons"), ("oracle experts 8", "experts:8"), ("oracle experts 32", "experts:32"),
           ("oracle experts 64", "experts:64"), ("gate router", "gate"), ("gate router, weighted", "gate_weighted"),
           ("gate 75%, then oracle 50%", "two_stage")]
PASSES = [
    ("ffn_to_moe 8 experts (1 shared, top 3)", [{"pass": "ffn_to_moe", "experts": 8, "shared": 1, "top_k": 3}]),
    ("route_neurons 50%", [{"pass": "route_neurons", "active": 0.5}]),
    ("route_neurons 75%", [{"pass": "route_neurons", "active": 0.75}]),
    # composition (run with --rows and another --out): the parts and the whole
    ("int4 g64", [{"pass": "quantize", "format": "int4", "group_size": 64}]),
    ("route_neurons 50% + int4 g64", [{"pass": "route_neurons", "active": 0.5}, {"pass": "quantize", "format": "int4", "group_size": 64}]),
]
DEFAULT_ROWS = [name for name, _ in ORACLES] + [name for name, _ in PASSES[:3]]


class PatchedFfns:
    """Every FFN of a Llama-style model computes ``down(mask(act(gate) * up))`` with the mask of
    ``self.mode`` (None: the dense FFN)."""

    def __init__(self, model, calibration_ids: torch.Tensor):
        self.mode = None
        self.mlps = [layer.mlp for layer in model.model.layers]
        inputs: dict[int, list] = {}
        for i, mlp in enumerate(self.mlps):
            mlp.forward = types.MethodType(self._forward(i, inputs), mlp)
        with torch.no_grad():
            self.mode = "record"
            for start in range(0, calibration_ids.shape[1] - 511, 512):
                model(input_ids=calibration_ids[:, start : start + 512], use_cache=False)
            self.mode = None
            for i, mlp in enumerate(self.mlps):
                x = torch.cat(inputs[i])
                mlp.up_mean = mlp.up_proj(x).abs().mean(dim=0)
                mlp.down_norm = mlp.down_proj.weight.norm(dim=0)

    def _forward(self, index: int, inputs: dict):
        patched = self

        def forward(mlp, x):
            gate = mlp.act_fn(mlp.gate_proj(x))
            hidden = gate * mlp.up_proj(x)
            if patched.mode == "record":
                inputs.setdefault(index, []).append(x.reshape(-1, x.shape[-1]))
            elif patched.mode is not None:
                hidden = patched.mask(mlp, hidden, gate)
            return mlp.down_proj(hidden)

        return forward

    def mask(self, mlp, hidden: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[-1]
        k = n // 2
        if self.mode == "neurons":
            return keep_top_neurons_reference(hidden, hidden, mlp.down_norm, k)
        if self.mode == "gate":
            return keep_top_neurons_reference(hidden, gate, torch.ones(n), k)
        if self.mode == "gate_weighted":
            return keep_top_neurons_reference(hidden, gate, mlp.up_mean * mlp.down_norm, k)
        if self.mode == "two_stage":
            wide = keep_top_neurons_reference(hidden, gate, mlp.up_mean * mlp.down_norm, 3 * n // 4)
            return keep_top_neurons_reference(wide, wide, mlp.down_norm, k)
        experts = int(self.mode.split(":")[1])
        grouped = hidden.reshape(*hidden.shape[:-1], experts, n // experts)
        down = mlp.down_proj.weight.reshape(-1, experts, n // experts)
        norms = torch.einsum("...es,des->...ed", grouped, down).norm(dim=-1)
        keep = torch.zeros_like(norms).scatter_(-1, norms.topk(experts // 2, dim=-1).indices, 1.0)
        return (grouped * keep[..., None]).reshape(hidden.shape)


@torch.no_grad()
def evaluate(model, patched: PatchedFfns, rows: list[dict], graphs: dict, ids: torch.Tensor, windows: int) -> dict:
    chunks = token_windows(ids, 512, windows, what="eval.txt")
    ref_nll, scored = 0.0, 0
    nll = [0.0] * len(rows)
    kl = [0.0] * len(rows)
    for window in chunks:
        window = window[None]
        patched.mode = None
        reference = model(input_ids=window, use_cache=False).logits
        ref_nll += window_nll(reference, window)
        ref_logp = torch.log_softmax(reference[0, :-1].float(), dim=-1)
        for k, row in enumerate(rows):
            if row["kind"] == "oracle":
                patched.mode = row["mode"]
                logits = model(input_ids=window, use_cache=False).logits
                patched.mode = None
            else:
                graph = graphs[row["name"]]
                logits = run_graph(graph, inputs_from_tokens(graph, window))[-1]
            nll[k] += window_nll(logits, window)
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            kl[k] += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum())
        scored += window.shape[1] - 1
    reference = math.exp(ref_nll / scored)
    for k, row in enumerate(rows):
        row["perplexity"] = math.exp(nll[k] / scored)
        row["delta_pct"] = 100 * (row["perplexity"] / reference - 1)
        row["kl"] = kl[k] / scored
    return {"perplexity": reference, "scored_tokens": scored, "windows": len(chunks), "window_length": 512}


def markdown(payload: dict) -> str:
    ref = payload["reference"]
    out = [
        f"SmolLM2-135M, eval.txt: {ref['windows']} windows of 512 tokens ({ref['scored_tokens']:,} scored tokens); "
        f"float32 perplexity {ref['perplexity']:.4f}. 50% of FFN neurons active unless the row says otherwise. "
        f"KL: mean per token of KL(p_float || p_row). Agreement: {payload['prompts']} prompts x {payload['new_tokens']} "
        f"greedy tokens, fraction identical to the float model's. Calibration: calib.txt only.",
        "",
        "| row | kind | perplexity | vs float32 | KL | agreement |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        agree = f"{r['agreement']:.3f}" if r.get("agreement") is not None else "-"
        out.append(f"| {r['name']} | {r['kind']} | {r['perplexity']:.4f} | {r['delta_pct']:+.2f}% | {r['kl']:.4f} | {agree} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rows", nargs="*", default=None, help="row names to run (default: the oracles and the three pass rows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = lqc.models.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    calibration = calibration_from("calib", tokenizer)
    calibration_ids = torch.cat(calibration.sequences)[:4096][None]
    rows = [{"name": n, "kind": "oracle", "mode": m} for n, m in ORACLES]
    rows += [{"name": n, "kind": "pass", "recipe": [{"pass": "cleanup"}, *r]} for n, r in PASSES]
    rows = [r for r in rows if r["name"] in (args.rows or DEFAULT_ROWS)]
    graphs = {}
    for row in rows:
        if row["kind"] == "pass":
            start = time.perf_counter()
            graph = trace(model, ids[:512][None])
            PassManager(row["recipe"]).run(graph, PassContext(calibration=calibration, progress=False))
            graphs[row["name"]] = graph
            row["pass_seconds"] = round(time.perf_counter() - start, 1)
    patched = PatchedFfns(model, calibration_ids)  # after the passes traced the unpatched model
    start = time.perf_counter()
    reference = evaluate(model, patched, rows, graphs, ids, args.windows)
    print(f"float32 {reference['perplexity']:.4f}; evaluation {time.perf_counter() - start:.0f} s", flush=True)
    payload = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads, "reference": reference,
               "prompts": args.prompts, "new_tokens": args.new_tokens, "rows": rows}
    prompts = eval_prompts(ids, args.prompts)
    float_tokens = greedy_tokens(model, prompts, args.new_tokens)
    for row in rows:
        if row["kind"] == "oracle":
            patched.mode = row["mode"]
            row["agreement"] = agreement(float_tokens, greedy_tokens(model, prompts, args.new_tokens)).agreement
            patched.mode = None
        else:
            torch._dynamo.reset()
            compressed = lqc.compress(model, row["recipe"], calibration=calibration, tokenizer=tokenizer, target="eager",
                                      progress=False)
            row["agreement"] = agreement(float_tokens, greedy_tokens(compressed, prompts, args.new_tokens)).agreement
        print(f"{row['name']}: {row['perplexity']:.4f} ({row['delta_pct']:+.2f}%), KL {row['kl']:.4f}, "
              f"agreement {row['agreement']:.3f}", flush=True)
        if args.out:
            write_results(args.out, payload, markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
