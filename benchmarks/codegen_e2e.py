"""target="triton" on the real model: SmolLM2-135M int4, every qlinear group a generated kernel,
logits against the same int4 weights through lqc::qlinear's float32 reference (target="eager").
``--format fp8 / w8a8`` quantizes to that format instead; ``--concat`` runs concat_linears first,
so every RMSNorm has one reader and runs inside its qlinear's kernel (the prologue).

On CPU the kernels run under TRITON_INTERPRET=1: this checks that the generated code computes the
model, not how fast it runs (the interpreter executes each program in numpy).

    python benchmarks/codegen_e2e.py --out benchmarks/results/codegen-e2e-smollm2-cpu
    python benchmarks/codegen_e2e.py --concat --format w8a8 --out benchmarks/results/codegen-e2e-smollm2-concat-w8a8-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import lqc  # noqa: E402
from lqc.codegen import kernel_cache  # noqa: E402



def recipe(fmt: str, concat: bool, reference: bool) -> list[dict]:
    """The int4 recipe's passes (or another format's); reference: weights kept in the canonical
    layout, which lqc::qlinear's float32 reference computes."""
    quantize = {"pass": "quantize", "format": fmt}
    if fmt == "int4":
        quantize.update(group_size=32, method="hqq")
    if reference:
        quantize["kernels"] = False
    return [{"pass": "cleanup"}, *([{"pass": "concat_linears"}] if concat else []), quantize]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--format", default="int4", choices=["int4", "int8", "fp8", "w8a8", "fp8_dyn"])
    parser.add_argument("--concat", action="store_true", help="concat_linears first: the norms become kernel prologues")
    parser.add_argument("--out", default=None, help="write <out>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer, name = lqc.models.load(args.model)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids[:, : args.tokens]
    reference = lqc.compress(model, recipe(args.format, args.concat, True), example_inputs=ids, progress=False)
    with torch.no_grad():
        expected = reference(ids).logits
    torch._dynamo.reset()
    before = (kernel_cache.stats.written, kernel_cache.stats.loaded, kernel_cache.stats.reused)
    start = time.perf_counter()
    compiled = lqc.compress(model, recipe(args.format, args.concat, False), example_inputs=ids, progress=False,
                            target="triton")
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        logits = compiled(ids).logits
    run_s = time.perf_counter() - start
    # each compiled graph's TritonProgram (the CompiledGraph's fn), as lowered to generated kernels
    programs = [c.fn.fn for c in lqc.session_of(compiled).compilations if not c.fallback]
    lowered = [n for program in programs for n in program.graph_module.graph.nodes
               if n.target is torch.ops.lqc.fused_qlinear.default]
    result = {
        "model": name, "format": args.format, "concat_linears": args.concat,
        "fused_qlinears": len(lowered), "with_norm_prologue": sum(n.args[6] is not None for n in lowered), "tokens": ids.shape[1], "target": "triton", "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "max_abs_diff": (logits - expected).abs().max().item(), "max_abs_logit": expected.abs().max().item(),
        "same_argmax": bool((logits.argmax(-1) == expected.argmax(-1)).all()),
        "compile_and_first_run_s": compile_s, "run_s": run_s,
        "kernels_written": kernel_cache.stats.written - before[0], "kernels_loaded": kernel_cache.stats.loaded - before[1],
        "kernel_uses_reused": kernel_cache.stats.reused - before[2],
    }
    for key, value in result.items():
        print(f"{key:<26} {value}")
    if args.out:
        path = Path(f"{args.out}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
