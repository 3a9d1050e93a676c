"""Long-context perplexity of SmolLM2-135M with a compressed KV cache (KIVI-style quantization,
StreamingLLM and SnapKV eviction), its size, generation agreement and decode speed.

Protocol: non-overlapping windows of ``--window`` (2048) tokens of eval.txt, from the start. Each
window is fed to the model ``--chunk`` (128) tokens at a time through one cache, so every token
attends to all earlier tokens of its window as the cache holds them (quantized, for the
quantized caches) and to its own chunk in full precision; every token but the window's first is
scored. The compressed caches run lqc's KV attention, which reads the quantized codes directly
(lqc.runtime.kv.attention); the float row runs the same chunks through transformers'
DynamicCache and SDPA. float32 model, 2 threads.

Eviction rows (opt-in): ``--window-evict W`` keeps the sinks and the last W tokens (float, and
int4 with the quantization options); ``--snapkv K`` (float) applies SnapKV to every step of more
than K + ``--observation`` tokens, i.e. to each 128-token chunk here: of the tokens not yet
closed, all but the last ``--observation`` are cut to the K most attended per KV head.
Low-rank rows (``--lowrank R``): the model with Palu keys and values (lqc.runtime.kv.lowrank),
its latents in a DynamicCache (float32).

KV bytes per token: the cache's stored bytes after a full window (codes, float16 scales and zeros,
and the full-precision sinks and recent tokens, float32 here) divided by the window length,
against a float16 cache of the same model (2 tensors x layers x KV heads x head_dim x 2 bytes).
"per quantized token" counts only the closed blocks: the steady-state rate of a long context.

Decode speed (``--speed``): eager forward calls, batch 1; the first ``--context`` (2048) tokens
of eval.txt prefilled through a fresh cache, then ``--decode`` (32) greedy steps timed; median of
``--runs`` (3) runs per cache, the caches interleaved.

Compiled rows (``--compiled``): the same model under ``lqc.compress`` (torch.compile, backend
lqc, target eager) with transformers' own DynamicCache: "compiled-float" with the default
recipe, "compiled-int{bits}" with the ``compress_kv`` pass, which rewrites the graphs' cache
update and attention into ``lqc::kv_dynamic_attention`` (the same quantization options). They
should match the eager rows of the same bits: the graph path computes what CompressedKVCache does.

Generation agreement (``--agreement N``): greedy decoding of ``--new-tokens`` (256) tokens after
each of N prompts of ``--prompt-length`` (512) tokens, taken 2048 tokens apart from the start of
eval.txt, through a fresh cache per prompt; the share of generated tokens equal to the float
cache's at the same position, for each quantized cache.

    python benchmarks/kv_quality.py --out benchmarks/results/smollm2-kv-quality
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from transformers import DynamicCache

import lqc
from lqc.bench import benchmark_calibration, write_results
from lqc.data import data_file, tokenize_file
from lqc.evaluate import agreement, cached_logits, eval_prompts, perplexity
from lqc.runtime.kv import graph_cache as kv_graph_cache
from lqc.runtime.kv.lowrank import lowrank_kv
from lqc.runtime.kv.cache import CompressedKVCache, CompressedKVLayer, float_kv_bytes_per_token


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--windows", type=int, default=None, help="at most this many windows (default: all)")
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 4, 2])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window-evict", type=int, default=None, metavar="W",
                        help="add StreamingLLM rows: the sinks and the last W tokens, float and int4")
    parser.add_argument("--snapkv", type=int, default=None, metavar="K",
                        help="add a SnapKV row (float): each step of more than K + --observation tokens keeps its top K")
    parser.add_argument("--observation", type=int, default=32)
    parser.add_argument("--lowrank", type=float, nargs="*", default=[], metavar="R",
                        help="add Palu rows: keys and values kept at rank R x KV heads x head_dim (float latents, "
                             "whitened on 4,096 tokens of calib.txt)")
    parser.add_argument("--compiled", action="store_true", help="add rows through torch.compile and the compress_kv pass")
    parser.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True, help="measure perplexity and size")
    parser.add_argument("--agreement", type=int, default=0, help="prompts for the generation agreement (0: skip)")
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--speed", action="store_true", help="time decode after --context tokens")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = lqc.models.load(args.model)
    model, config = loaded.model, loaded.model.config
    ids = tokenize_file(data_file("eval.txt"), loaded.tokenizer)
    float16_per_token = float_kv_bytes_per_token(config, 2)
    caches = {"float": lambda: DynamicCache(config=config)}
    for bits in args.bits:
        caches[f"int{bits}"] = lambda bits=bits: CompressedKVCache(config, bits, args.group, args.residual, args.sinks)
    if args.window_evict:
        caches[f"window{args.window_evict}"] = lambda: CompressedKVCache(config, None, sinks=args.sinks, window=args.window_evict)
        caches[f"int4-window{args.window_evict}"] = lambda: CompressedKVCache(
            config, 4, args.group, args.residual, args.sinks, window=args.window_evict)
    if args.snapkv:
        caches[f"snapkv{args.snapkv}"] = lambda: CompressedKVCache(config, None, sinks=args.sinks, snapkv=args.snapkv,
                                                                   observation=args.observation)
    row_model = {}  # rows that run another model than the loaded one (low-rank keys and values)
    for rank in args.lowrank:
        calibration = torch.cat(benchmark_calibration(loaded).windows(1, 512, 8))
        row_model[f"lowrank{rank:g}"] = lowrank_kv(copy.deepcopy(model), rank, calibration)
        caches[f"lowrank{rank:g}"] = lambda: DynamicCache(config=config)
    if args.compiled:
        # each compiled variant makes its own graphs of the same forward, and dynamo's limit of 8 per
        # function counts them all: past it a variant would run uncompiled (over NaN placeholders)
        torch._dynamo.config.recompile_limit = 64
        compiled = {"compiled-float": lqc.compress(model, "exact", progress=False)}
        for bits in args.bits:
            recipe = [{"pass": "cleanup"}, {"pass": "compress_kv", "bits": bits, "group": args.group,
                                            "residual": args.residual, "sinks": args.sinks}]
            compiled[f"compiled-int{bits}"] = lqc.compress(model, recipe, progress=False)
        for name, compiled_model in compiled.items():
            row_model[name] = compiled_model
            caches[name] = lambda: DynamicCache(config=config)
    rows = []
    with torch.no_grad():
        for name, new_cache in caches.items() if args.perplexity else ():
            result = perplexity(cached_logits(row_model.get(name, model), new_cache, args.chunk), ids, window_length=args.window,
                                max_windows=args.windows, progress=False)
            cache = new_cache()  # one full window through a fresh cache, for its size
            cached_logits(row_model.get(name, model), lambda: cache, args.chunk)(ids[None, : args.window])
            layers = [layer if isinstance(layer, CompressedKVLayer) else kv_graph_cache.layer_for(layer.keys)
                      for layer in cache.layers]
            layers = [layer for layer in layers if layer is not None]
            stored = sum(stored_kv_bytes(layer) for layer in cache.layers)
            quantized = [layer.quantized_nbytes_per_token() for layer in layers]
            row = {"cache": name, "perplexity": result.perplexity, "scored_tokens": result.scored_tokens,
                   "windows": result.windows, "seconds": round(result.seconds, 1),
                   "kv_bytes_per_token": stored / args.window,
                   "per_quantized_token": sum(quantized) if quantized and None not in quantized else None}
            row["vs_float16_cache"] = row["kv_bytes_per_token"] / float16_per_token
            if row["per_quantized_token"]:
                row["per_quantized_token_vs_float16"] = row["per_quantized_token"] / float16_per_token
            rows.append(row)
            base = rows[0]["perplexity"]
            print(f"{name}: {result.perplexity:.4f} ({100 * (result.perplexity / base - 1):+.2f}%), "
                  f"{row['kv_bytes_per_token']:,.0f} KV bytes/token ({row['vs_float16_cache']:.3f}x float16)", flush=True)
    agreements = {}
    if args.agreement:
        prompts = eval_prompts(ids, args.agreement, length=args.prompt_length, spacing=args.window)
        generated = {name: generate_each(row_model.get(name, model), prompts, new_cache, args.new_tokens) for name, new_cache in caches.items()}
        for name in caches:
            if name != "float":
                agreements[name] = agreement(generated["float"], generated[name]).to_json()
                print(f"{name}: {agreements[name]['agreement']:.4f} of generated tokens equal the float cache's", flush=True)
    speeds = {}
    if args.speed:
        times = {name: [] for name in caches}
        for run in range(args.runs):
            for name, new_cache in caches.items():
                times[name].append(decode_seconds(row_model.get(name, model), ids[None, : args.context], new_cache(), args.decode))
        for name in caches:
            speeds[name] = {"decode_tokens_per_s": args.decode / statistics.median(times[name]),
                            "runs_s": times[name]}
            speeds[name]["vs_float"] = speeds[name]["decode_tokens_per_s"] / speeds["float"]["decode_tokens_per_s"]
            print(f"{name}: {speeds[name]['decode_tokens_per_s']:.2f} tok/s at {args.context} context "
                  f"({speeds[name]['vs_float']:.3f}x float)", flush=True)
    lines = [f"{loaded.name} float32, {rows[0]['windows']} windows of {args.window} tokens of eval.txt "
             f"({rows[0]['scored_tokens']:,} scored), fed {args.chunk} tokens at a time through the cache. "
             f"Quantized: group {args.group}, {args.residual} recent tokens and {args.sinks} sinks in full precision. "
             f"A float16 cache holds {float16_per_token:,} bytes per token.", "",
             "| cache | perplexity | vs float cache | KV bytes/token at {0} | vs float16 | per quantized token | vs float16 |".format(args.window),
             "|---|---:|---:|---:|---:|---:|---:|"] if rows else []
    base = rows[0]["perplexity"] if rows else None
    for r in rows:
        quantized = (f"{r['per_quantized_token']:,.0f} | {r['per_quantized_token_vs_float16']:.3f}x"
                     if r["per_quantized_token"] else "- | -")
        lines.append(f"| {r['cache']} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
                     f"{r['kv_bytes_per_token']:,.0f} | {r['vs_float16_cache']:.3f}x | {quantized} |")
    if agreements:
        lines += ["", f"Greedy generation of {args.new_tokens} tokens after {args.agreement} prompts of {args.prompt_length} tokens "
                  f"of eval.txt, against the float cache:", "", "| cache | tokens equal | first divergence per prompt |", "|---|---:|---|"]
        for name, a in agreements.items():
            lines.append(f"| {name} | {a['agreement']:.4f} ({a['matched_tokens']}/{a['generated_tokens']}) | {a['first_divergence']} |")
    if speeds:
        lines += ["", f"Decode after {args.context} tokens of context, {args.decode} steps, eager, median of {args.runs} runs:", "",
                  "| cache | decode tok/s | vs float |", "|---|---:|---:|"]
        lines += [f"| {name} | {v['decode_tokens_per_s']:.2f} | {v['vs_float']:.3f}x |" for name, v in speeds.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads, "window": args.window,
                "chunk": args.chunk, "group": args.group, "residual": args.residual, "sinks": args.sinks}
        write_results(args.out, {**meta, "rows": rows, "agreement": agreements, "speed": speeds}, table)
    return 0


def stored_kv_bytes(layer) -> int:
    """What one layer of a cache stores: a compressed layer counts itself; a DynamicLayer its tensors."""
    if isinstance(layer, CompressedKVLayer):
        return layer.nbytes()
    if (compressed := kv_graph_cache.layer_for(layer.keys)) is not None:  # the compress_kv pass's handles
        return compressed.nbytes()
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, cache, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps after ``prompt`` is prefilled into ``cache``."""
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@torch.no_grad()
def generate_each(model, prompts, new_cache, new_tokens: int) -> list[torch.Tensor]:
    """Greedy tokens after each prompt, each through a fresh cache."""
    out = []
    for prompt in prompts:
        tokens = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                cache=new_cache())
        out.append(tokens[0, prompt.shape[1] :])
    return out


if __name__ == "__main__":
    sys.exit(main())
