"""Decode speed and KV-cache size of SmolLM2-135M after dropping attention sublayers.

Variants, all through an lqc.Session backend with target auto (Inductor for the graph), float32, static
KV cache, ``dynamic=False``, batch 1, 2 threads (DESIGN.md's decode protocol, as
benchmarks/quant_speed.py):

- ``full``: ``cleanup`` only, every layer kept;
- ``drop-attn-N``: ``cleanup`` + ``drop_layers`` (what: attention, count: N, scored on
  calibration text), the cache built with the dropped layers' slots freed
  (``Runner(dropped_attention=...)``, what ``generate()`` does after ``lqc.compress``);
- ``drop-attn-N-full-cache``: the same graph with an ordinary cache (the dropped layers' slots
  are written with zeros and still read by nobody): the cache's share of the gain.

Each variant decodes ``--decode`` tokens after a ``--prompt``-token prompt (random ids), for
every prompt length given; timed runs are interleaved across variants and the median is kept.

Expected figures:

- KV bytes per token: kept attention layers x 2 (keys, values) x KV heads x head dim x 4 bytes;
  measured: the cache's bytes (lqc.runtime.structural.dropped_layers.kv_cache_nbytes) / its length, for
  the static cache and for the dynamic cache after ``generate()``;
- decode speed-up: batch-1 decode reads every weight and the whole static cache once per token,
  so the expected ratio is (weight bytes + cache bytes) of ``full`` over the same of the variant.

    python benchmarks/drop_speed.py --out benchmarks/results/smollm2-drop-speed
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import lqc
from lqc.bench import Runner, benchmark_calibration, write_results
from lqc.runtime.structural.dropped_layers import kv_cache_nbytes
from lqc.runtime.kv.cache import float_kv_bytes_per_token


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a name lqc.models.load knows (tiny-llama for a smoke run)")
    parser.add_argument("--count", type=int, default=8, help="attention sublayers to drop")
    parser.add_argument("--prompts", type=int, nargs="*", default=[128, 1024], help="prompt lengths")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = lqc.models.load(args.model)
    model, config = loaded.model, loaded.model.config
    calibration = benchmark_calibration(loaded)
    drop = [{"pass": "cleanup"}, {"pass": "drop_layers", "what": "attention", "count": args.count, "choice": "cosine"}]  # the committed table's choice

    def compiled(recipe):
        session = lqc.Session({"recipe": recipe, "target": "auto", "progress": False, "calibration": calibration})
        return torch.compile(model.forward, backend=session, dynamic=False), session

    drop_name = f"drop-attn-{args.count}"
    forwards, sessions = {}, {}
    for key, recipe in (("full", [{"pass": "cleanup"}]), (drop_name, drop)):
        forwards[key], sessions[key] = compiled(recipe)
    rows, dropped = [], []
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for prompt_length in args.prompts:
            prompt = torch.randint(0, config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(0))
            cache_length = prompt_length + args.decode
            runners, weight_bytes = {}, {}
            for name in ("full", drop_name, f"{drop_name}-full-cache"):
                print(f"[{prompt_length}] compiling and warming up {name} ...", flush=True)
                key = drop_name if name.startswith("drop") else "full"
                forward, session = forwards[key], sessions[key]
                if name == drop_name and not dropped:
                    # a graph without a cache calibrates (the choice is then cached for every graph of the
                    # model); its record says which layers the cache can leave out
                    first = len(session.compilations)
                    forward(input_ids=prompt, use_cache=False)
                    record = next(r for rep in session.reports[first:] for r in rep.records if r.name == "drop_layers")
                    dropped[:] = record.details.dropped_attention_layers
                first = len(session.compilations)  # the graphs this variant's warm-up compiles
                runner = Runner(model, forward, dropped_attention=dropped if name == drop_name else None)
                _, _, cache = runner.decode(prompt, min(3, args.decode), cache_length)
                done = [r for r in session.reports[first:] if not r.fallback]
                weight_bytes[name] = done[-1].bytes_after if done else weight_bytes.get(drop_name)
                runners[name] = (runner, kv_cache_nbytes(cache))
            times = {name: [] for name in runners}
            for run in range(args.runs):
                print(f"[{prompt_length}] timed run {run + 1}/{args.runs} ...", flush=True)
                for name, (runner, _) in runners.items():
                    times[name].append(runner.decode(prompt, args.decode, cache_length)[1])
            full_tps = args.decode / statistics.median(times["full"])
            full_read = weight_bytes["full"] + runners["full"][1]
            for name, (runner, cache_bytes) in runners.items():
                kept = config.num_hidden_layers - (len(dropped) if name == drop_name else 0)
                tps = args.decode / statistics.median(times[name])
                rows.append({
                    "variant": name, "prompt": prompt_length, "cache_length": cache_length,
                    "dropped": dropped if name.startswith("drop") else [],
                    "decode_tokens_per_s": tps, "runs_tokens_per_s": [args.decode / t for t in times[name]],
                    "speedup_measured": tps / full_tps,
                    "speedup_expected": full_read / (weight_bytes[name] + cache_bytes),
                    "weight_bytes": weight_bytes[name], "kv_cache_bytes": cache_bytes,
                    "kv_bytes_per_token_measured": cache_bytes / cache_length,
                    "kv_bytes_per_token_expected": float_kv_bytes_per_token(config, 4, kept) if name != f"{drop_name}-full-cache"
                    else float_kv_bytes_per_token(config, 4),
                })
                print(f"[{prompt_length}] {name}: {tps:.2f} tok/s ({rows[-1]['speedup_measured']:.3f}x measured, "
                      f"{rows[-1]['speedup_expected']:.3f}x expected), KV {rows[-1]['kv_bytes_per_token_measured']:.0f} B/token", flush=True)

        # the dynamic cache of generate() after lqc.compress: bytes per stored token
        dynamic = {}
        for name, recipe in (("full", [{"pass": "cleanup"}]), (drop_name, drop)):
            torch._dynamo.reset()
            compressed = lqc.compress(model, recipe, calibration=calibration, progress=False)
            prompt = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
            out = compressed.generate(prompt, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
            cache = out.past_key_values
            dynamic[name] = {"tokens": cache.get_seq_length(), "bytes": kv_cache_nbytes(cache),
                             "bytes_per_token": kv_cache_nbytes(cache) / cache.get_seq_length(),
                             "dropped": list(getattr(compressed, "_lqc_dropped_attention", []))}
            print(f"dynamic cache {name}: {dynamic[name]['bytes_per_token']:.0f} B/token over {dynamic[name]['tokens']} tokens", flush=True)

    lines = [f"{loaded.name} float32, decode of {args.decode} tokens, static cache, median of {args.runs} interleaved runs, "
             f"{args.threads} threads, torch {torch.__version__}. Dropped attention of blocks {dropped} (scored).", "",
             "| prompt | variant | decode tok/s | speed-up measured | speed-up expected | weight MB | KV bytes/token measured | expected |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['prompt']} | {row['variant']} | {row['decode_tokens_per_s']:.2f} | {row['speedup_measured']:.3f}x | "
                     f"{row['speedup_expected']:.3f}x | {row['weight_bytes'] / 1e6:.1f} | {row['kv_bytes_per_token_measured']:,.0f} | "
                     f"{row['kv_bytes_per_token_expected']:,} |")
    lines += ["", "Dynamic cache after `generate()` on the `lqc.compress`ed model (64-token prompt, 16 new tokens):", "",
              "| variant | tokens | KV bytes | KV bytes/token measured | expected |", "|---|---:|---:|---:|---:|"]
    for name, d in dynamic.items():
        kept = config.num_hidden_layers - len(d["dropped"])
        lines.append(f"| {name} | {d['tokens']} | {d['bytes']:,} | {d['bytes_per_token']:,.0f} | {float_kv_bytes_per_token(config, 4, kept):,} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        meta = {"model": loaded.name, "torch": torch.__version__, "threads": args.threads, "decode": args.decode, "runs": args.runs}
        write_results(args.out, {**meta, "rows": rows, "dynamic_cache": dynamic}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
