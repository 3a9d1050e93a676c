"""Quality of lqc's named recipes on one real model: the table published per model (docs/models.md).

Per recipe: weight bytes as stored (every tensor the compressed graphs hold, embeddings and lm_head
included) against float32, perplexity on eval.txt against float32 eager (DESIGN.md protocol:
non-overlapping 512-token windows, all 128 unless ``--windows``), and greedy generation agreement
with float32 (``--gen-prompts`` prompts of 32 tokens from eval.txt, ``--gen-tokens`` new tokens
each; the share of generated tokens equal to float32's at the same position). Calibrated recipes
see calib.txt only. One process measures every row on the same windows.

KV-cache recipes (those with a ``compress_kv`` pass) change nothing when a window runs in one call
without a cache, so their rows feed each window ``--chunk`` (128) tokens at a time through
transformers' DynamicCache (every token attends to the earlier chunks as the cache holds them),
against a float32 row measured the same way.

Models whose tokenizer starts every text with a BOS token (Gemma: without it the model degenerates
into repeating one token) get it in front of every evaluation window, prompt and calibration window
(``--bos``; by default where ``lqc.data.bos_token`` finds the tokenizer adds one); the BOS position
itself is not scored, so every row scores the same tokens as a window without it.

    python benchmarks/model_quality.py --model gemma3-270m --out benchmarks/results/gemma3-quality
    python benchmarks/model_quality.py --recipes my-recipe.yaml --windows 16   # a recipe file, a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import lqc
from lqc.bench import write_results
from lqc.data import bos_token, calibration_from, tokenize_file
from lqc.evaluate import PerplexityResult, agreement, cached_logits, causal_lm_logits, eval_prompts, greedy_tokens, perplexity
from lqc.passes.recipe import read_recipe_file
from lqc.recipes import resolve_recipe

RECIPES = ["default", "int8", "int4-gptq", "w8a8", "kv-int4", "max"]


def compressed_bytes(compiled: torch.nn.Module) -> int:
    """Bytes of the constants the first compiled graph holds after the recipe's last pass: the model
    as stored. (The CPU lowering after it may keep a second, packed copy of a tied table for the
    lm_head's matmul; that is run-time memory, not the model's size.)"""
    records = lqc.session_of(compiled).reports[0].records
    return [r for r in records if r.stage == "recipe"][-1].bytes_after


def is_kv_recipe(recipe: str) -> bool:
    """A named recipe, a composition or a recipe file, with a compress_kv pass."""
    data = resolve_recipe(recipe)
    data = read_recipe_file(data) if isinstance(data, str) else data
    return any(entry["pass"] == "compress_kv" for entry in (data["passes"] if isinstance(data, dict) else data))


def kept_rows(args, reference) -> list[dict]:
    """The rows of ``--out``'s JSON for recipes this run does not measure: only when that file's
    float32 reference is this run's to the last digit (same model, windows, BOS), so every row of
    the table stays a change against the same perplexity."""
    previous = json.loads(Path(args.out + ".json").read_text())
    if previous["reference"]["whole"]["perplexity"] != reference["whole"].perplexity or previous["bos"] != args.bos:
        raise SystemExit(f"--update: {args.out}.json was measured against another reference "
                         f"({previous['reference']['whole']['perplexity']} vs {reference['whole'].perplexity}); measure every row again")
    if reference["chunked"] is None and "chunked" in previous["reference"]:
        reference["chunked"] = PerplexityResult(**previous["reference"]["chunked"])
    return previous["rows"]


def measure(model, tokenizer, ids, recipe, args, calibration, reference, prompts, ref_tokens):
    from transformers import DynamicCache

    started = time.perf_counter()
    compiled = lqc.compress(model, recipe, calibration=calibration, tokenizer=tokenizer,
                            example_inputs=ids[: args.window_length][None])
    compile_s = time.perf_counter() - started
    kv = is_kv_recipe(recipe)
    # the model's own cache layout (sliding-window layers keep their window), as generate() builds it
    logits = cached_logits(compiled, lambda: DynamicCache(config=model.config), args.chunk) if kv else causal_lm_logits(compiled)
    result = perplexity(logits, ids, window_length=args.window_length, max_windows=args.windows, desc=f"lqc {recipe}", bos=args.bos)
    base = reference["chunked" if kv else "whole"]
    tokens = greedy_tokens(compiled, prompts, args.gen_tokens) if prompts else []
    row = {"recipe": recipe, "bytes": compressed_bytes(compiled), "perplexity": result.perplexity,
           "delta_pct": (result.perplexity / base.perplexity - 1) * 100, "scored_tokens": result.scored_tokens,
           "evaluation": f"chunks of {args.chunk} through a cache" if kv else "whole windows", "compile_s": compile_s,
           "agreement": agreement(ref_tokens, tokens).agreement if prompts else None}
    torch._dynamo.reset()  # the next recipe compiles afresh (dynamo's recompile limit is per function)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--window-length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--gen-prompts", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bos", choices=["auto", "yes", "no"], default="auto", help="a BOS token before each window and prompt")
    parser.add_argument("--out", default=None)
    parser.add_argument("--update", action="store_true",
                        help="keep --out's rows for recipes not measured now (refused unless its float32 reference is this run's)")
    args = parser.parse_args()
    if args.update and not (args.out and Path(args.out + ".json").is_file()):
        parser.error("--update keeps the rows of an earlier --out OUT (OUT.json): give --out with an existing result")
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    model, tokenizer, name = lqc.models.load(args.model)
    ids = tokenize_file("eval", tokenizer)
    args.bos = {"auto": bos_token(tokenizer), "yes": tokenizer.bos_token_id, "no": None}[args.bos]
    # calibration windows start the way evaluation windows do
    calibration = dataclasses.replace(calibration_from("calib", tokenizer), bos=args.bos)
    float_bytes = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
    with torch.no_grad():
        reference = {
            "whole": perplexity(causal_lm_logits(model), ids, window_length=args.window_length, max_windows=args.windows,
                                desc="float32", bos=args.bos),
            "chunked": perplexity(cached_logits(model, lambda: DynamicCache(config=model.config), args.chunk), ids,
                                  window_length=args.window_length,
                                  max_windows=args.windows, desc="float32 cached", bos=args.bos)
            if any(is_kv_recipe(r) for r in args.recipes) else None,
        }
        prompts = eval_prompts(ids, args.gen_prompts, bos=args.bos)
        ref_tokens = greedy_tokens(model, prompts, args.gen_tokens) if prompts else []
        kept = kept_rows(args, reference) if args.update else []  # refused here, before any recipe is measured
        fresh = {}
        for recipe in args.recipes:
            fresh[recipe] = measure(model, tokenizer, ids, recipe, args, calibration, reference, prompts, ref_tokens)
            print(fresh[recipe], flush=True)
        rows = [fresh.pop(row["recipe"], row) for row in kept] + list(fresh.values())
    lines = [f"# lqc's recipes on {name}\n",
             f"eval.txt, {reference['whole'].windows} windows of {args.window_length} tokens "
             f"({reference['whole'].scored_tokens:,} scored), float32 reference perplexity {reference['whole'].perplexity:.4f}"
             + (f" (fed {args.chunk} tokens at a time through a cache: {reference['chunked'].perplexity:.4f})"
                if reference["chunked"] else "")
             + ("; a BOS token before every window and prompt" if args.bos is not None else "")
             + f"; float32 weights {float_bytes / 1e6:.1f} MB; greedy agreement over {len(prompts)} prompts x "
               f"{args.gen_tokens} tokens; {args.threads} threads."
             + (f" Rows measured in this run: {', '.join(args.recipes)}; the others in an earlier run against the same "
                f"reference (--update)." if args.update else "") + "\n",
             "| recipe | weight MB | x float32 | perplexity | change | greedy agreement | evaluated as | compress s |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        agree = f"{row['agreement']:.3f}" if row["agreement"] is not None else "-"
        lines.append(f"| {row['recipe']} | {row['bytes'] / 1e6:.1f} | {row['bytes'] / float_bytes:.3f} | {row['perplexity']:.4f} | "
                     f"{row['delta_pct']:+.2f}% | {agree} | {row['evaluation']} | {row['compile_s']:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        payload = {"model": name, "bos": args.bos, "float_bytes": float_bytes, "windows": args.windows, "window_length": args.window_length,
                   "reference": {k: v.to_json() for k, v in reference.items() if v is not None}, "rows": rows}
        write_results(args.out, payload, table)


if __name__ == "__main__":
    main()
