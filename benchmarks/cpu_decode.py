"""CPU decode against the anchor, in one process run: Inductor bf16, torchao, llama.cpp and lqc.

Issue 25's benchmark (SmolLM2-135M, batch 1, ``--threads`` threads, greedy). Per variant:

- ``decode_tokens_per_s``: ``--decode`` tokens after a ``--prompt``-token prompt (static cache of
  prompt + decode slots); ``decode_tokens_per_s_2048``: ``--long-decode`` tokens after a
  ``--long-prompt``-token prompt; ``prefill_ms``: one ``--prefill``-token prompt;
- ``weight_mb``: all weights as stored; ``read_mb_per_token``: what one decode step reads (every
  weight but the embedding table, which is gathered a row at a time, unless the head reads it;
  plus the KV cache slots attention reads at the short prompt), and ``roofline_fraction``: that
  over this machine's streaming-read bandwidth (measured here), against the measured step time;
- ``ppl_delta_pct``: perplexity on eval.txt (``--windows`` windows of 512) against the float32 model;
- ``peak_rss_mb`` (``--rss``): the peak resident memory of a fresh process holding only that
  variant, while it decodes (the peak is reset after loading and compiling: /proc/self/clear_refs).

Timed runs are interleaved across variants (drift hits all alike); medians of ``--runs``. Variants
that cannot run here (torchao or llama-cpp-python not installed) stay in the table as "not installed".

    python benchmarks/cpu_decode.py --out benchmarks/results/cpu-decode
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time

import torch

import lqc
from lqc.bench import Runner, compile_for_decode, model_weight_bytes, write_results

MODEL = "smollm2-135m"


def int4(group: int, activations: str = "int8") -> list[dict]:
    """int4 block linears and lm_head (round to nearest), with int8 (VNNI) or bf16 activations."""
    return [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": group, "method": "rtn",
                                  "include_lm_head": True, "activations": activations}]


# name -> recipe, every one on the bfloat16 model (torch's and lqc's CPU kernels want bf16 activations)
LQC_VARIANTS = {
    "lqc-int4-g64-bf16act": int4(64, "bf16"),  # issue 25's starting point: torch's int4 kernel, lm_head int4
    "lqc-cpu-fast": "cpu-fast",  # the named recipe: blocks int4 g32 (the GGUF's own Q4_1 blocks) x int8, lm_head int8
    "lqc-int4-g32-a8": int4(32),  # smaller: the lm_head int4 too
    "lqc-cpu-fast-kv4": "cpu-fast+kv-int4",  # for long contexts: an int4 KV cache
}
BASELINES = ("inductor-bf16", "torchao-int8-wo-all", "llama.cpp-q4_1")


class LlamaCppRunner:
    """llama.cpp (llama-cpp-python) on the model's own Q4_1 GGUF, driven like Runner."""

    def __init__(self, threads: int, context: int, logits_all: bool = False):
        from llama_cpp import Llama

        from lqc.models import smollm2_gguf_path

        self.llm = Llama(model_path=str(smollm2_gguf_path()), n_ctx=context, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)

    def _last_logits(self):
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def prefill(self, ids: torch.Tensor) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids[0].tolist())
        return time.perf_counter() - start

    def decode(self, prompt: torch.Tensor, steps: int, cache_length: int):
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt[0].tolist())
        token = int(self._last_logits().argmax())
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = int(self._last_logits().argmax())
        return prompt_s, time.perf_counter() - start, None

    def window_logits(self, window: torch.Tensor) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(window[0].tolist())
        return torch.from_numpy(self.llm.scores[: window.shape[1]].copy())[None]


def build(name: str, model: torch.nn.Module, bf16: torch.nn.Module, threads: int, context: int):
    """(runner, weight bytes, bytes a decode step reads besides the KV cache) of one variant; None if not installed."""
    embedding = model.get_input_embeddings().weight.numel() * 2  # bf16 table, gathered a row at a time
    if name == "inductor-bf16":
        return Runner(bf16, compile_for_decode(bf16.forward)), model_weight_bytes(bf16), model_weight_bytes(bf16)
    if name == "torchao-int8-wo-all":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            return None
        quantized = copy.deepcopy(bf16)
        quantize_(quantized, Int8WeightOnlyConfig())
        size = model_weight_bytes(quantized)
        return Runner(quantized, compile_for_decode(quantized.forward)), size, size - embedding
    if name == "llama.cpp-q4_1":
        try:
            runner = LlamaCppRunner(threads, context)
        except ImportError:
            return None
        from gguf import GGUFReader

        size = sum(int(t.n_bytes) for t in GGUFReader(str(lqc.models.smollm2_gguf_path())).tensors)
        return runner, size, size  # the tied Q8_0 token_embd is the output matrix: read every step
    session = lqc.Session({"recipe": LQC_VARIANTS[name], "target": "auto", "progress": False})
    runner = Runner(bf16, compile_for_decode(bf16.forward, session))
    runner.session = session
    return runner, None, None  # sizes known once the first call compiled


def lqc_sizes(runner: Runner, embedding: int) -> tuple[int, int]:
    """(weight bytes, bytes a decode step reads): all but the embedding table, gathered a row at a
    time (the lm_head is quantized as its own copy); the table as stored, int8 where quantized.
    An int8 table sharing the lm_head's canonical codes reports 0 bytes; the packed CPU layout then
    gave the head a copy of its own, so the shared codes are the table's alone."""
    report = [r for r in runner.session.reports if not r.fallback][-1]
    rows = [row for record in report.records for row in getattr(record.details, "layers", [])
            if hasattr(row, "kind")]  # quantize's LayerRows (pack_cpu_layouts lists names)
    tables = [row.bytes_after for row in rows if row.kind == "embedding"]
    table = tables[-1] if tables else embedding
    if tables and table == 0:
        table = next(row.bytes_after for row in reversed(rows) if row.layer == "lm_head")
    return report.bytes_after, report.bytes_after - table


def kv_read_bytes(config, slots: int, bytes_per_value: float) -> float:
    """Bytes attention reads from a cache of ``slots`` positions per decode step (keys and values, every layer)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * bytes_per_value * slots


def stream_bandwidth(threads: int, megabytes: int = 512) -> float:
    """GB/s of a streaming read (a sum over a buffer far larger than the caches), best of 5."""
    torch.set_num_threads(threads)
    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()
    best = min(_seconds(buffer.sum) for _ in range(5))
    return buffer.numel() * 4 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def perplexity_of(runner, name: str, eval_ids: torch.Tensor, windows: int) -> float:
    from lqc.evaluate import perplexity

    if isinstance(runner, LlamaCppRunner):  # logits for every position need a context that keeps them all
        fn = LlamaCppRunner(torch.get_num_threads(), 512, logits_all=True).window_logits
    else:
        fn = lambda ids: runner.forward(input_ids=ids, use_cache=False).logits  # noqa: E731
    return perplexity(fn, eval_ids, max_windows=windows, desc=f"ppl {name}").perplexity if windows else float("nan")


def peak_rss_child(name: str, args) -> float | None:
    """Run this script for one variant in a fresh process; its peak resident MB while decoding."""
    cmd = [sys.executable, __file__, "--rss-child", name, "--threads", str(args.threads), "--prompt", str(args.prompt),
           "--decode", str(args.decode)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["peak_rss_mb"] if lines else None


def rss_child(name: str, args) -> int:
    """The --rss-child side: load, build, warm up, reset the peak, decode, print the peak."""
    torch.set_num_threads(args.threads)
    model = lqc.models.load(MODEL).model
    bf16 = copy.deepcopy(model).to(torch.bfloat16) if not name.startswith("llama.cpp") else None
    built = build(name, model, bf16, args.threads, args.prompt + args.decode)
    del model  # the float32 reference is not part of any variant
    runner = built[0]
    prompt = torch.randint(0, 49152, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        runner.decode(prompt, 3, args.prompt + args.decode)
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the peak from here on is the decoding process's
        runner.decode(prompt, args.decode, args.prompt + args.decode)
    status = open("/proc/self/status").read()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(json.dumps({"variant": name, "peak_rss_mb": peak_kb / 1024}))
    return 0


LLAMA_CPP_RSS = """
import json, sys, time, numpy as np
from llama_cpp import Llama
path, threads, prompt, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=prompt + decode, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = list(np.random.default_rng(0).integers(0, llm.n_vocab(), prompt))
def run(steps):
    llm.reset(); llm.eval(ids)
    for _ in range(steps):
        llm.eval([int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())])
run(3)
open("/proc/self/clear_refs", "w").write("5")
run(decode)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"peak_rss_mb": peak / 1024}))
"""


def peak_rss_llama_cpp(args) -> float | None:
    """llama.cpp's peak in a process that imports only llama_cpp (not torch), as its users run it."""
    out = subprocess.run([sys.executable, "-c", LLAMA_CPP_RSS, str(lqc.models.smollm2_gguf_path()), str(args.threads),
                          str(args.prompt), str(args.decode)], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["peak_rss_mb"] if lines else None


def timed(runners: dict, args, prompt, long_prompt, prefill_ids, log) -> dict:
    """Interleaved timed runs: name -> {"prefill": [s], "decode": [s], "decode_long": [s]}."""
    times = {name: {"prefill": [], "decode": [], "decode_long": []} for name in runners}
    for run in range(args.runs):
        log(f"timed run {run + 1}/{args.runs} ...")
        order = list(runners) if run % 2 == 0 else list(reversed(runners))
        for name in order:
            r = runners[name]
            times[name]["prefill"].append(r.prefill(prefill_ids))
            times[name]["decode"].append(r.decode(prompt, args.decode, args.prompt + args.decode)[1])
            if args.long_prompt:
                times[name]["decode_long"].append(
                    r.decode(long_prompt, args.long_decode, args.long_prompt + args.long_decode)[1])
    return times


def table(rows: list[dict], meta: dict) -> str:
    llama = next((r for r in rows if r["name"].startswith("llama.cpp") and r.get("decode_tokens_per_s")), None)
    lines = [f"SmolLM2-135M, {meta['threads']} threads, batch 1, greedy; decode {meta['decode']} tokens after "
             f"{meta['prompt']} ({meta['long_decode']} after {meta['long_prompt']}), prefill {meta['prefill']} tokens, "
             f"median of {meta['runs']} interleaved runs; streaming-read bandwidth {meta['bandwidth_gb_s']:.1f} GB/s; "
             f"ppl on {meta['windows']} windows of eval.txt (float32 {meta['ppl_float32']:.4f}); torch {torch.__version__}.", "",
             "| variant | decode tok/s | vs llama.cpp | after 2048 tok/s | prefill ms | weight MB | read MB/token | "
             "roofline | peak RSS MB | ppl delta |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("decode_tokens_per_s") is None:
            lines.append(f"| {r['name']} | {r.get('status', 'not run')} |  |  |  |  |  |  |  |  |")
            continue
        ratio = f"{r['decode_tokens_per_s'] / llama['decode_tokens_per_s']:.2f}x" if llama else "-"
        fmt = lambda v, spec: "-" if v is None or v != v else format(v, spec)  # noqa: E731
        lines.append(f"| {r['name']} | {r['decode_tokens_per_s']:.1f} | {ratio} | {fmt(r['decode_tokens_per_s_2048'], '.1f')} | "
                     f"{r['prefill_ms']:.0f} | {r['weight_mb']:.1f} | {r['read_mb_per_token']:.1f} | "
                     f"{r['roofline_fraction']:.2f} | {fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(r['ppl_delta_pct'], '+.2f')}{'%' if r['ppl_delta_pct'] is not None else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--long-prompt", type=int, default=2048, help="0 skips the long-context decode")
    parser.add_argument("--long-decode", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--windows", type=int, default=128, help="eval.txt windows for perplexity (0 skips it)")
    parser.add_argument("--rss", nargs="*", default=None,
                        help="measure peak resident memory in a fresh process: of these variants (no names: all)")
    parser.add_argument("--ppl-variants", nargs="*", default=None, help="variants whose perplexity is measured (default: all)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.rss_child:
        return rss_child(args.rss_child, args)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    names = args.only or [*BASELINES, *LQC_VARIANTS]
    bandwidth = stream_bandwidth(args.threads)
    log(f"streaming read: {bandwidth:.1f} GB/s")
    torch.set_num_threads(args.threads)
    loaded = lqc.models.load(MODEL)
    model = loaded.model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    embedding = model.get_input_embeddings().weight.numel() * 2
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt, long_prompt, prefill_ids = (torch.randint(0, vocab, (1, n), generator=gen)
                                        for n in (args.prompt, max(args.long_prompt, 1), args.prefill))
    rows, runners, sizes = [], {}, {}
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for name in names:
            log(f"building and warming up {name} ...")
            built = build(name, model, bf16, args.threads, max(args.long_prompt + args.long_decode, args.prefill,
                                                                args.prompt + args.decode))
            if built is None:
                rows.append({"name": name, "status": "not installed"})
                continue
            runner = built[0]
            runner.prefill(prefill_ids)
            runner.decode(prompt, 2, args.prompt + args.decode)
            if args.long_prompt:
                runner.decode(long_prompt, 2, args.long_prompt + args.long_decode)
            sizes[name] = lqc_sizes(runner, embedding) if built[1] is None else built[1:]
            runners[name] = runner
        times = timed(runners, args, prompt, long_prompt, prefill_ids, log)
        from lqc.data import tokenize_file

        eval_ids = tokenize_file("eval", loaded.tokenizer) if args.windows else None
        ppl_float = perplexity_of(Runner(model, model.forward), "float32", eval_ids, args.windows)
        for name, runner in runners.items():
            t = times[name]
            step = statistics.median(t["decode"]) / args.decode
            kv_bytes = 0 if name.startswith("llama.cpp") else kv_read_bytes(model.config, args.prompt + args.decode, 2)
            if name.startswith("llama.cpp"):  # f16 cache, the filled cells padded to 256
                kv_bytes = kv_read_bytes(model.config, -(-(args.prompt + args.decode // 2) // 256) * 256, 2)
            read = sizes[name][1] + kv_bytes
            wanted = args.ppl_variants is None or name in args.ppl_variants
            ppl = perplexity_of(runner, name, eval_ids, args.windows if wanted else 0)
            rows.append({
                "name": name, "recipe": LQC_VARIANTS.get(name),
                "decode_tokens_per_s": args.decode / statistics.median(t["decode"]),
                "decode_tokens_per_s_2048": (args.long_decode / statistics.median(t["decode_long"])
                                             if t["decode_long"] else None),
                "prefill_ms": statistics.median(t["prefill"]) * 1e3,
                "weight_mb": sizes[name][0] / 1e6, "read_mb_per_token": read / 1e6,
                "roofline_fraction": read / step / (bandwidth * 1e9),
                "ppl": ppl if ppl == ppl else None,  # NaN: not measured
                "ppl_delta_pct": (ppl / ppl_float - 1) * 100 if ppl == ppl else None,
                "runs": {k: [round(x, 5) for x in v] for k, v in t.items()},
            })
            log(f"  {name}: {rows[-1]['decode_tokens_per_s']:.1f} tok/s, ppl {ppl:.4f}")
    if args.rss is not None:
        for row in rows:
            if row.get("decode_tokens_per_s") is not None and (not args.rss or row["name"] in args.rss):
                log(f"peak RSS of {row['name']} in a fresh process ...")
                row["peak_rss_mb"] = (peak_rss_llama_cpp(args) if row["name"].startswith("llama.cpp")
                                      else peak_rss_child(row["name"], args))
    meta = {"model": MODEL, "torch": torch.__version__, "threads": args.threads, "prompt": args.prompt,
            "decode": args.decode, "long_prompt": args.long_prompt, "long_decode": args.long_decode,
            "prefill": args.prefill, "runs": args.runs, "windows": args.windows, "bandwidth_gb_s": bandwidth,
            "ppl_float32": ppl_float}
    text = table(rows, meta)
    print(text)
    if args.out:
        write_results(args.out, {**meta, "variants": rows}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
