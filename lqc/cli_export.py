"""``lqc export SOURCE --to compressed-tensors|gguf -o OUT``: a compressed model for vLLM, transformers, llama.cpp.

SOURCE is a folder ``lqc.save`` (or ``lqc compress``) wrote, exported as it is, or a model (a name
such as ``smollm2-135m``, a Hugging Face folder, a .gguf file) compressed here first with
``--recipe``. For compressed-tensors the recipe's int4 ``quantize`` entries get integer zero points
(``zero_point: integer``, the one thing that format needs of lqc) unless the entry sets its own.
"""

from __future__ import annotations

import time
from pathlib import Path

from .cli_checks import recipe_arg


def add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="write a compressed model as compressed-tensors (vLLM, transformers) or GGUF (llama.cpp)")
    export.add_argument("source", help="a folder lqc.save wrote, or a model to compress first (name, HF folder, .gguf)")
    export.add_argument("--to", dest="fmt", required=True, choices=("compressed-tensors", "gguf"))
    export.add_argument("-o", "--out", required=True, help="folder (compressed-tensors) or .gguf file to write")
    export.add_argument("--recipe", default=None, help="compress SOURCE with this recipe first (a model, not a saved folder)")
    export.add_argument("--calibration", default=None, help="'calib' (shared calib.txt) or a text file, for calibrated recipes")
    export.add_argument("--requantize", action="store_true",
                        help="re-round what the format cannot hold exactly (float int4 zero points; GGUF block sizes) and report the change")
    export.add_argument("--tokenizer-gguf", default=None, help="GGUF file whose tokenizer the GGUF export carries (default: the source's own)")
    export.add_argument("--ppl-windows", type=int, default=16, help="with --requantize: eval.txt windows the perplexity change is measured on")
    export.add_argument("--threads", type=int, default=2)


def check_export(args) -> None:
    from lqc.ir.errors import LqcConfigError
    from lqc.models import model_kind

    kind = model_kind(args.source)
    if kind == "lqc" and args.recipe is not None:
        raise LqcConfigError(f"{args.source} is a saved compressed model: export it without --recipe, or give the model to compress")
    if kind != "lqc" and args.recipe is None:
        raise LqcConfigError(f"{args.source} is a model, not a folder lqc.save wrote: add --recipe to compress it first")
    out = Path(args.out)
    if args.fmt == "gguf" and out.suffix != ".gguf":
        raise LqcConfigError(f"-o {args.out}: a GGUF export is one file; give a path ending in .gguf")


def cmd_export(args) -> int:
    import tempfile

    import torch

    import lqc
    from lqc.models import model_kind, smollm2_gguf_path

    torch.set_num_threads(args.threads)
    kind = model_kind(args.source)
    tokenizer_gguf = args.tokenizer_gguf
    if tokenizer_gguf is None and args.fmt == "gguf":  # a model that came from a GGUF file keeps that file's tokenizer
        tokenizer_gguf = smollm2_gguf_path() if kind == "smollm2" else args.source if kind == "gguf" else None
    with tempfile.TemporaryDirectory(prefix="lqc-export-") as scratch:
        checkpoint = args.source
        if kind != "lqc":
            model, tokenizer, name = lqc.models.load(args.source)
            started = time.perf_counter()
            compressed = lqc.compress(model, export_recipe(recipe_arg(args.recipe), args.fmt), calibration=args.calibration, tokenizer=tokenizer)
            checkpoint = lqc.save(compressed, Path(scratch) / "checkpoint", tokenizer=tokenizer)
            print(f"compressed {name} with {args.recipe} in {time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        report = lqc.export(checkpoint, args.fmt, args.out, requantize=args.requantize, tokenizer_gguf=tokenizer_gguf)
        print(format_report(report))
        out = Path(args.out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
        print(f"exported to {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s; {next_step(args.fmt, args.out)}")
        if args.requantize and _requantized(report):
            print(requantized_perplexity(checkpoint, args.fmt, out, args.ppl_windows))
    return 0


def _requantized(report: dict) -> bool:
    entries = (report.get("layers") or report.get("tensors") or {}).values()
    return any(not info["exact"] and info.get("source", "int4") in ("int4", "int8", "w8a8", "fp8", "fp8_dyn") for info in entries)


def requantized_perplexity(checkpoint, fmt: str, out: Path, windows: int) -> str:
    """What --requantize cost: perplexity on eval.txt of lqc's model and of the export as its engine's
    transformers loader reads it."""
    import torch
    import transformers

    import lqc
    from lqc.data import data_file, tokenize_file
    from lqc.evaluate import causal_lm_logits, perplexity

    ours = lqc.load(checkpoint).eval()
    if fmt == "gguf":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    else:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError):
        return f"requantized: {checkpoint} holds no tokenizer, so the perplexity change was not measured"
    ids = tokenize_file(data_file("eval.txt"), tokenizer)
    before = perplexity(causal_lm_logits(ours), ids, max_windows=windows, desc="lqc's model").perplexity
    after = perplexity(causal_lm_logits(theirs.eval()), ids, max_windows=windows, desc="the export").perplexity
    return (f"requantized: perplexity on eval.txt ({windows} windows) {before:.4f} -> {after:.4f} "
            f"({100 * (after / before - 1):+.2f}%)")


def export_recipe(recipe, fmt: str) -> list[dict]:
    """The recipe's entries, with integer int4 zero points where compressed-tensors needs them."""
    from lqc.recipes import resolve_recipe

    entries = resolve_recipe(recipe)
    entries = entries["passes"] if isinstance(entries, dict) and "passes" in entries else entries
    if fmt != "compressed-tensors" or not isinstance(entries, list):
        return entries
    return [dict(entry, zero_point="integer") if entry.get("pass") == "quantize" and entry.get("format") == "int4"
            and "zero_point" not in entry else entry for entry in entries]


def format_report(report: dict) -> str:
    """One line per scheme (or GGUF type): how many tensors, and whether each was written exactly."""
    rows: dict[str, list] = {}
    for info in (report.get("layers") or report.get("tensors") or {}).values():
        kind = info.get("scheme") or f"{info['type']} (from {info['source']})"
        rows.setdefault(kind, []).append(info)
    lines = [f"{report['format']}:"]
    for kind, infos in rows.items():
        moved = [i["max_abs_change"] for i in infos if not i["exact"]]
        exactness = "exactly lqc's values" if not moved else f"{len(moved)} not bit-exact, largest weight change {max(moved):.3g}"
        lines.append(f"  {len(infos):4d} x {kind}: {exactness}")
    if report.get("ignore"):
        lines.append(f"  kept float: {', '.join(report['ignore'])}")
    lines += [f"  note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def next_step(fmt: str, out: str) -> str:
    if fmt == "gguf":
        return f"run it with llama-cli -m {out}"
    return f"load it with transformers.AutoModelForCausalLM.from_pretrained({out!r}) (pip install 'lqc[export]'), or vllm serve {out}"
