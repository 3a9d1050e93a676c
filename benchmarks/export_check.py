"""Does an exported SmolLM2 run in the other engines as it runs in lqc? (issue 27's acceptance)

For each format: compress SmolLM2-135M with lqc (``lqc.compress`` + ``lqc.save``), export the saved
folder (``lqc.export``, timed), load the export the way a user of that engine would, and compare
it with lqc's own compressed model (``lqc.load`` of the same folder, eager, float32):

- compressed-tensors: ``AutoModelForCausalLM.from_pretrained(OUT)`` (transformers + the
  compressed-tensors package, no lqc code involved);
- GGUF: ``gguf.GGUFReader`` reads it back, transformers' GGUF loader loads it; with llama.cpp
  installed (the optional ``bench`` extra) its greedy 32 tokens on 3 prompts are compared too.

Reported per format: the relative difference of the logits on the first eval window
(``|a - b| / |b|``, Frobenius), perplexity of both on eval.txt (all 128 windows by default) and
its relative difference, the export's seconds and size. lqc's model is loaded with the recipe's
``kernels: false`` where set: the reference (float32) dequantize-and-matmul, the same arithmetic
the other engines' CPU paths use, so a difference is the format's, not bf16 kernels'.

    python benchmarks/export_check.py --out benchmarks/results/export-check
    python benchmarks/export_check.py --only int4-g64-int --windows 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import lqc
from lqc.bench import write_results
from lqc.data import data_file, tokenize_file
from lqc.evaluate import causal_lm_logits, eval_prompts, greedy_tokens, perplexity


def quantize(fmt: str, **options) -> list[dict]:
    return [{"pass": "cleanup"}, {"pass": "quantize", "format": fmt, "kernels": False, **options}]


CALIB = {"calibration_tokens": 16384}
VARIANTS = {  # name -> (export format, recipe, needs calibration)
    "int8": ("compressed-tensors", quantize("int8"), False),
    "int4-g32-int": ("compressed-tensors", quantize("int4", group_size=32, zero_point="integer"), False),
    "int4-g32-sym": ("compressed-tensors", quantize("int4", group_size=32, zero_point="symmetric"), False),
    "int4-g64-int": ("compressed-tensors", quantize("int4", group_size=64, zero_point="integer"), False),
    "int4-g64-sym": ("compressed-tensors", quantize("int4", group_size=64, zero_point="symmetric"), False),
    "int4-g128-int": ("compressed-tensors", quantize("int4", group_size=128, zero_point="integer"), False),
    "int4-g128-sym": ("compressed-tensors", quantize("int4", group_size=128, zero_point="symmetric"), False),
    "w8a8": ("compressed-tensors", quantize("w8a8"), False),
    "fp8": ("compressed-tensors", quantize("fp8"), False),
    "fp8_dyn": ("compressed-tensors", quantize("fp8_dyn"), False),
    "int4-g64-gptq-actorder-int": ("compressed-tensors", quantize("int4", group_size=64, zero_point="integer", method="gptq",
                                                                 act_order=True, **CALIB), True),
    "int4-g64-awq-int": ("compressed-tensors", quantize("int4", group_size=64, zero_point="integer", method="awq", **CALIB), True),
    "w8a8-smoothquant": ("compressed-tensors", quantize("w8a8", smoothquant=True, **CALIB), True),
    "gguf-q8_0": ("gguf", quantize("int8"), False),
    "gguf-q4_1": ("gguf", quantize("int4", group_size=32), False),
}


def load_export(fmt: str, path: Path):
    import transformers

    if fmt == "gguf":
        import gguf

        gguf.GGUFReader(str(path))  # reads back, or raises
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def check_variant(name: str, model_name: str, ids: torch.Tensor, windows: int, workdir: Path) -> dict:
    fmt, recipe, calibrated = VARIANTS[name]
    torch._dynamo.reset()  # each compression captures afresh; dynamo stops after 8 compilations of one forward
    model, tokenizer, _ = lqc.models.load(model_name)
    started = time.perf_counter()
    compressed = lqc.compress(model, recipe, calibration="calib" if calibrated else None, tokenizer=tokenizer)
    checkpoint = lqc.save(compressed, workdir / f"{name}-lqc", tokenizer=tokenizer)
    compress_s = time.perf_counter() - started
    del compressed, model
    out = workdir / (f"{name}.gguf" if fmt == "gguf" else f"{name}-export")
    started = time.perf_counter()
    tokenizer_gguf = lqc.models.smollm2_gguf_path() if fmt == "gguf" else None
    report = lqc.export(checkpoint, fmt, out, tokenizer_gguf=tokenizer_gguf)
    export_s = time.perf_counter() - started
    ours, theirs = lqc.load(checkpoint).eval(), load_export(fmt, out)
    window = ids[None, :512]
    a, b = theirs(input_ids=window).logits, ours(input_ids=window).logits
    row = {"name": name, "format": fmt, "compress_s": round(compress_s, 1), "export_s": round(export_s, 1),
           "export_mb": round(_size(out) / 1e6, 1), "logits_rel_diff": float((a - b).norm() / b.norm()),
           "exact_layers": sum(1 for info in _entries(report) if info["exact"]), "layers": len(_entries(report))}
    ours = weight_only_as_dense(ours, window, b)
    ppl_ours = perplexity(causal_lm_logits(ours), ids, max_windows=windows, desc=f"{name} lqc").perplexity
    ppl_theirs = perplexity(causal_lm_logits(theirs), ids, max_windows=windows, desc=f"{name} export").perplexity
    row.update(ppl_lqc=round(ppl_ours, 4), ppl_export=round(ppl_theirs, 4), ppl_rel_diff_pct=round(100 * (ppl_theirs / ppl_ours - 1), 4))
    if fmt == "gguf":
        row["llama_cpp_greedy_match"] = llama_cpp_match(out, ours, ids)
    print(row, flush=True)
    return row


def weight_only_as_dense(model, window: torch.Tensor, logits: torch.Tensor):
    """lqc's reference weight-only qlinear dequantizes its weight on every call (2.5x a float
    forward); a Linear holding that dequantized weight computes the same thing once. Checked on the
    first window; activation-quantizing layers (w8a8, fp8_dyn) stay as they are."""
    from lqc.runtime.quantization.formats import QuantizedWeight
    from lqc.runtime.quantization.qlinear import QLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QLinear) and module.kernel in ("int8", "int4", "fp8"):
            q = QuantizedWeight(module.kernel, module.qweight, module.scales, module.zeros, module.group_size, module.in_features)
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data, dense.bias = q.dequantize(), module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    assert torch.allclose(model(input_ids=window).logits, logits, rtol=0, atol=1e-4), "dense copy differs from lqc's qlinear"
    return model


def llama_cpp_match(path: Path, ours, ids: torch.Tensor) -> str:
    """How llama.cpp's greedy 32 tokens on 3 eval prompts compare with lqc's: whole sequences equal,
    and the tokens before the first difference. Also against llama.cpp running SmolLM2's own GGUF
    (the file lqc loaded): the export's weights are that file's, so equal sequences there show that
    any difference from lqc is llama.cpp's arithmetic (it quantizes activations to 8 bits)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return "not installed"
    prompts = eval_prompts(ids, 3)
    expected = [t.tolist() for t in greedy_tokens(ours, prompts, 32)]
    exported = _llama_cpp_greedy(Llama, path, prompts, 32)
    original = _llama_cpp_greedy(Llama, lqc.models.smollm2_gguf_path(), prompts, 32)
    return (f"vs lqc {_compare(exported, expected)}; vs llama.cpp on the original GGUF {_compare(exported, original)}")


def _llama_cpp_greedy(llama_class, path: Path, prompts: list[torch.Tensor], count: int) -> list[list[int]]:
    llm = llama_class(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    out = []
    for prompt in prompts:
        tokens = []
        for token in llm.generate(prompt[0].tolist(), top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == count:
                break
        out.append(tokens)
    return out


def _compare(a: list[list[int]], b: list[list[int]]) -> str:
    """'2/3 equal, 29 tokens before the first difference on average'."""
    prefixes = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t))) for s, t in zip(a, b)]
    equal = sum(s == t for s, t in zip(a, b))
    return f"{equal}/{len(a)} equal, {sum(prefixes) / len(prefixes):.1f} of {len(a[0])} tokens before the first difference"


def _entries(report: dict) -> list[dict]:
    return list((report.get("layers") or report.get("tensors") or {}).values())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--only", nargs="*", default=None, choices=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--previous", default=None, help="a JSON this script wrote (same model, windows): its rows come first")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, tokenizer, _ = lqc.models.load(args.model)
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    rows = json.loads(Path(args.previous).read_text())["variants"] if args.previous else []
    with tempfile.TemporaryDirectory(prefix="lqc-export-check-") as scratch:
        for name in args.only or VARIANTS:
            rows.append(check_variant(name, args.model, ids, args.windows, Path(scratch)))
    columns = ["name", "format", "logits_rel_diff", "ppl_lqc", "ppl_export", "ppl_rel_diff_pct", "exact_layers", "layers",
               "export_s", "export_mb", "llama_cpp_greedy_match"]
    table = markdown_table(rows, columns, args)
    print(table)
    if args.out:
        write_results(args.out, {"model": args.model, "windows": args.windows, "threads": args.threads, "variants": rows}, table)
    return 0


def markdown_table(rows: list[dict], columns: list[str], args) -> str:
    head = (f"# Exported {args.model} in other engines vs lqc's own model\n\n`python benchmarks/export_check.py` "
            f"({args.windows} windows of eval.txt, {args.threads} threads). logits: first eval window, relative "
            f"Frobenius difference; exact_layers: quantized tensors written with lqc's values bit for bit.\n\n")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.2e}" if c == "logits_rel_diff" else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
