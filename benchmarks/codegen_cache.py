"""The kernel cache: cold and warm compiles at target="triton".

For each repeat, with a freshly loaded model (not timed) and an empty kernel-cache folder:
- cold: the first compile: weights compressed, every kernel's source generated, written, imported
  (with --autotune: every kernel's launch config tuned at each shape, as on a GPU by default),
  the rest of the graph compiled by Inductor with its cache folder empty too;
- warm: the same model compiled again (fresh dynamo): compressed weights from the transform
  cache, kernels and tuned configs from memory, Inductor's code from its cache: nothing
  generated, nothing measured;
- disk: the model loaded afresh and the kernel modules and tuned configs forgotten, as in a new
  process: weights compressed again, kernel sources and configs read back from the folder (what
  the on-disk caches alone save).

Prints the whole compile's wall time (``lqc.compress``, which also runs the example once), lqc's
own time (capture, passes, codegen) and its codegen time (lowering + kernel generation) for each, and the kernels written / loaded / reused;
saves JSON. On CPU the kernels run under TRITON_INTERPRET=1, where a kernel costs nothing to
compile; on a GPU the first launch of each kernel also pays Triton's compile.

    python benchmarks/codegen_cache.py --out benchmarks/results/codegen-cache-tiny-llama-cpu
    python benchmarks/codegen_cache.py --autotune --out benchmarks/results/codegen-cache-autotune-tiny-llama-cpu

(--model smollm2-135m works too, but lqc.compress runs the example through the interpreted
kernels three times a repeat: well over 15 minutes on 2 cores.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import lqc  # noqa: E402
from lqc.codegen import autotune, kernel_cache  # noqa: E402


def compile_once(model, ids, tune: bool) -> dict:
    torch._dynamo.reset()
    before = (kernel_cache.stats.written, kernel_cache.stats.loaded, kernel_cache.stats.reused, autotune.stats.tuned)
    start = time.perf_counter()
    compressed = lqc.compress(model, "int4", example_inputs=ids, progress=False, target="triton", autotune=tune)
    seconds = time.perf_counter() - start
    reports = list(lqc.session_of(compressed).reports)  # this compile's graphs (before the extra run below)
    with torch.no_grad():
        compressed(ids)
    after = (kernel_cache.stats.written, kernel_cache.stats.loaded, kernel_cache.stats.reused, autotune.stats.tuned)
    return {
        "compile_s": seconds,
        # lqc's own share: capture, the passes, lowering and kernel generation (no dynamo tracing,
        # no execution of the example, which under the interpreter dominates the wall time)
        "lqc_s": sum(r.capture_seconds + sum(rec.seconds for rec in r.records) + r.codegen_seconds for r in reports),
        "codegen_s": sum(r.codegen_seconds for r in reports),
        "written": after[0] - before[0], "loaded": after[1] - before[1], "reused": after[2] - before[2],
        "tuned": after[3] - before[3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autotune", action="store_true", help="tune launch configs (on a GPU the default)")
    parser.add_argument("--out", default=None, help="write <out>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lqc.codegen.triton_target  # noqa: F401  - imports (triton, the op) are not part of any compile

    rows = {"cold": [], "warm": [], "disk": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            os.environ["LQC_KERNEL_CACHE"] = folder
            # cold means every cache empty, Inductor's too (it compiles the rest of the graph)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")
            kernel_cache.forget_loaded()
            autotune.forget_tuned()
            model = lqc.models.load(args.model).model
            ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
            rows["cold"].append(compile_once(model, ids, args.autotune))
            rows["warm"].append(compile_once(model, ids, args.autotune))
            kernel_cache.forget_loaded()
            autotune.forget_tuned()
            model = lqc.models.load(args.model).model
            rows["disk"].append(compile_once(model, ids, args.autotune))

    summary = {}
    print(f"{args.model}, int4, target='triton' (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}), "
          f"autotune={args.autotune}, {args.tokens} tokens, median of {args.repeats}")
    print(f"{'compile':<8} {'whole s':>8} {'lqc s':>7} {'codegen ms':>11} {'written':>8} {'loaded':>7} {'reused':>7} {'tuned':>6}")
    for name, runs in rows.items():
        row = {
            "compile_s": statistics.median(r["compile_s"] for r in runs),
            "lqc_s": statistics.median(r["lqc_s"] for r in runs),
            "codegen_s": statistics.median(r["codegen_s"] for r in runs),
            "written": runs[-1]["written"], "loaded": runs[-1]["loaded"], "reused": runs[-1]["reused"],
            "tuned": runs[-1]["tuned"],
        }
        summary[name] = row
        print(f"{name:<8} {row['compile_s']:>8.3f} {row['lqc_s']:>7.3f} {row['codegen_s'] * 1e3:>11.1f} {row['written']:>8} "
              f"{row['loaded']:>7} {row['reused']:>7} {row['tuned']:>6}")
    for name in ("warm", "disk"):
        for part in ("compile", "lqc", "codegen"):
            summary[f"cold/{name} {part}"] = summary["cold"][f"{part}_s"] / summary[name][f"{part}_s"]
        print(f"cold / {name}: whole {summary[f'cold/{name} compile']:.2f}x, lqc {summary[f'cold/{name} lqc']:.2f}x, "
              f"codegen {summary[f'cold/{name} codegen']:.2f}x")
    if args.out:
        path = Path(f"{args.out}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": args.model, "recipe": "int4", "target": "triton", "tokens": args.tokens,
                                    "autotune": args.autotune,
                                    "runs": rows, "summary": summary}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
