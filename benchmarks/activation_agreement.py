"""Greedy agreement of lqc's int8-activation kernels with the bf16 weight-only path of the same weights.

Issue 25's check of the integer path: the same quantized weights (int4 g32 round to nearest, the
lm_head as in each recipe) decoded greedily with ``activations: int8`` (lqc's VNNI kernels) and
with ``activations: bf16`` (torch's int4 kernel; a w8a8 lm_head against int8 weight-only), 10
prompts of 32 tokens from eval.txt x 128 new tokens, static cache, compiled, bf16 model. Agreement
is the fraction of positions where the two greedy sequences carry the same token (after the first
divergence the contexts differ, so this is a lower bound on per-step agreement). Each path is also
compared with the unquantized bf16 model: how far any 4-bit path is from it on the same measure.

    python benchmarks/activation_agreement.py --out benchmarks/results/activation-agreement
"""

from __future__ import annotations

import argparse
import sys

import torch

import lqc
from lqc.bench import compile_for_decode, write_results
from lqc.evaluate import agreement, eval_prompts


def recipe(activations: str, head: str) -> list[dict]:
    blocks = {"pass": "quantize", "format": "int4", "group_size": 32, "method": "rtn", "activations": activations,
              "include_lm_head": head == "int4"}
    passes = [{"pass": "cleanup"}, blocks]
    if head == "int8":  # cpu-fast's lm_head: w8a8 (int8 activations) against int8 weight-only
        passes.append({"pass": "quantize", "format": "w8a8" if activations == "int8" else "int8",
                       "include_lm_head": True, "targets": ["^lm_head$"]})
    return passes


@torch.no_grad()
def greedy(model, forward, prompts, new_tokens: int) -> list[torch.Tensor]:
    from transformers import StaticCache

    out = []
    for prompt in prompts:
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
        logits = forward(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
        tokens = []
        for i in range(new_tokens):
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
            position = torch.tensor([[prompt.shape[1] + i]])
            logits = forward(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits
        out.append(torch.cat(tokens, dim=1)[0])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = lqc.models.load("smollm2-135m")
    model = loaded.model.to(torch.bfloat16)
    from lqc.data import tokenize_file

    prompts = eval_prompts(tokenize_file("eval", loaded.tokenizer), args.prompts)
    unquantized = greedy(model, compile_for_decode(model.forward), prompts, args.new_tokens)
    rows = []
    for head in ("int4", "int8"):
        tokens = {}
        for activations in ("bf16", "int8"):
            torch._dynamo.reset()
            session = lqc.Session({"recipe": recipe(activations, head), "progress": False})
            tokens[activations] = greedy(model, compile_for_decode(model.forward, session), prompts, args.new_tokens)
        result = agreement(tokens["bf16"], tokens["int8"])
        vs_model = {a: agreement(unquantized, tokens[a]).agreement for a in tokens}
        rows.append({"lm_head": head, "agreement": result.agreement, "matched": result.matched_tokens,
                     "total": result.generated_tokens, "first_divergence": result.first_divergence,
                     "bf16_activations_vs_unquantized": vs_model["bf16"], "int8_activations_vs_unquantized": vs_model["int8"]})
        print(f"lm_head {head}: int8 activations agree with bf16 on {result.agreement:.3f} of "
              f"{result.generated_tokens} tokens", flush=True)
    lines = [f"Greedy agreement, int8 activations (lqc's VNNI kernels) against bf16 activations on the same int4 g32 "
             f"weights, SmolLM2-135M bf16, {args.prompts} prompts x {args.new_tokens} tokens.", "",
             "| lm_head | int8 vs bf16 activations | tokens | first divergence per prompt | bf16 act. vs unquantized | "
             "int8 act. vs unquantized |", "|---|---:|---:|---|---:|---:|"]
    lines += [f"| {r['lm_head']} | {r['agreement']:.3f} | {r['total']} | {r['first_divergence']} | "
              f"{r['bf16_activations_vs_unquantized']:.3f} | {r['int8_activations_vs_unquantized']:.3f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        write_results(args.out, {"prompts": args.prompts, "new_tokens": args.new_tokens, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
