"""Which architectures lqc's recipes and pass families support: measured, not claimed.

For every architecture transformers ships that users bring (tiny random configs: small enough to
run every cell in seconds) and every named recipe plus each pass family, one cell:

- ``exact``: an exact recipe, output within 1e-5 (relative) of the eager model's;
- ``within bound``: every pass applied, output within the column's bound of the eager model's;
- ``falls back (reason)``: some region was left uncompressed, and lqc warned why;
- ``error (reason)``: lqc refused with an error that names the reason.

A cell that would be wrong is never written as one of those: ``crash`` (an exception that is not
lqc's error), ``wrong`` (output beyond the bound, or not finite) and ``silent`` (a pass changed
nothing and said nothing) are bugs; tests/test_support_matrix.py runs every cell and asserts the
claim docs/models.md makes for it.

Each cell traces the model once (dynamo, as the backend does), runs the recipe's passes and the
CPU lowering on a copy of the graph (calibration: 2 windows of random token ids) and compares the
logits on 16 tokens with the eager model's. KV-cache columns trace the model run with
use_cache=True (the graph that writes transformers' DynamicCache), since a cache is what they compress.

    python -m lqc.support_matrix --out docs/models.md
"""

from __future__ import annotations

import argparse
import functools
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lqc.ir.errors import LqcError

# name -> (transformers config class, model class, config kwargs); decoders first, then encoders
_DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),  # biases on q/k/v
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=8)),  # QK-norm
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, head_dim=8)),  # scaled embedding, (1 + w) norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, head_dim=8, sliding_window=8)),  # post-norms, soft-capping
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DECODER, head_dim=8, sliding_window=8,
                                                             layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)),  # fused qkv_proj and gate_up_proj
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2)),  # post-norms only, QK-norm
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_DECODER, embedding_multiplier=2.0, residual_multiplier=0.5,
                                                            attention_multiplier=0.2, logits_scaling=4.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                  bos_token_id=0, eos_token_id=0)),  # Conv1D
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=128, rotary_pct=0.25)),  # parallel blocks
    "bert": ("BertConfig", "BertForMaskedLM", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, max_position_embeddings=128)),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, cls_token_id=1, sep_token_id=2)),
}
ENCODERS = ("bert", "modernbert")
EXACT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Column:
    recipe: Any  # a named recipe or a list of pass entries
    exact: bool = False
    bound: float = 0.0  # relative logits error allowed (lossy columns) on these tiny random models
    kv: bool = False  # measured on a decode step through a cache
    zeroed_attention: int | None = None  # compared with the eager model whose attention of this block outputs zeros


_INT8, _INT4 = 0.05, 0.3
COLUMNS: dict[str, Column] = {
    "none": Column("none", exact=True), "exact": Column("exact", exact=True), "reparam": Column("reparam", exact=True),
    "default": Column("default", bound=_INT8), "int8": Column("int8", bound=_INT8), "int8-gptq": Column("int8-gptq", bound=_INT8),
    "w8a8": Column("w8a8", bound=_INT8), "int4": Column("int4", bound=_INT4), "int4-gptq": Column("int4-gptq", bound=_INT4),
    "int4-awq": Column("int4-awq", bound=_INT4), "cpu-fast": Column("cpu-fast", bound=_INT4), "max": Column("max", bound=_INT4),
    "kv-int8": Column("kv-int8", bound=_INT8, kv=True), "kv-int4": Column("kv-int4", bound=_INT4, kv=True),
    "moe": Column("moe", bound=_INT4), "moe-int8": Column("moe-int8", bound=_INT4),
    # the drop recipe takes 8 attention sublayers: these models have 2 blocks, so the column drops one
    "drop": Column([{"pass": "cleanup"}, {"pass": "drop_layers", "what": "attention", "count": 1, "choice": "kl",
                    "compensation": "linear"}], bound=1.5),  # random weights: a sanity bound, the rewrite is checked below
    # exact against the eager model with that attention's output zeroed: the rewrite is checked, not the loss
    "drop-attention": Column([{"pass": "cleanup"}, {"pass": "drop_layers", "what": "attention", "layers": [1]}], exact=True,
                             zeroed_attention=1),
    # pass families no named recipe covers alone
    "fold_norms": Column([{"pass": "cleanup"}, {"pass": "fold_norms"}], exact=True),
    "rotate": Column([{"pass": "cleanup"}, {"pass": "rotate"}], exact=True),
    "lowrank": Column([{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 32},
                       {"pass": "lowrank", "rank": 4}], bound=_INT4),
    "ffn_to_moe": Column([{"pass": "cleanup"}, {"pass": "ffn_to_moe", "experts": 4, "shared": 1, "top_k": 1}], bound=1.0),
    "drop-mlp": Column([{"pass": "cleanup"}, {"pass": "drop_layers", "what": "mlp", "layers": [1]}], bound=1.0),
}
FAILURES = ("crash", "wrong", "silent")  # a cell in one of these states is a bug, never documented


@dataclass(frozen=True)
class Cell:
    status: str  # exact | within bound | falls back | error | crash | wrong | silent
    reason: str = ""
    rel_error: float | None = None

    def text(self) -> str:
        return f"{self.status} ({self.reason})" if self.reason and self.status in ("falls back", "error") else self.status


def build(arch: str) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(transformers, model_cls)(config).eval()


def _token_ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


CALIBRATION_SEEDS = (1, 2)  # two windows of 128 random token ids


@functools.lru_cache(maxsize=None)
def traced(arch: str, cache: bool = False):
    """(model, its graph on 16 token ids, the ids, the eager logits): one capture per architecture.
    ``cache``: the decoder run with use_cache=True, its graph writing transformers' DynamicCache."""
    from lqc.ir import trace

    model = build(arch)
    ids = _token_ids(16, 0)
    kwargs = {} if arch in ENCODERS else {"use_cache": cache}
    torch._dynamo.reset()  # one capture each: dynamo's recompile limit counts captures of shared code
    with torch.no_grad():
        reference = model(input_ids=ids, **kwargs).logits
    return model, trace(model, input_ids=ids, **kwargs), ids, reference


def check_cell(arch: str, column: str) -> Cell:
    """Run one cell and say what it is (see the module docstring)."""
    spec = COLUMNS[column]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rel_error, applied = _run_graph(arch, spec.recipe, spec.zeroed_attention, cache=spec.kv and arch not in ENCODERS)
        except LqcError as exc:
            return Cell("error", _first_sentence(str(exc)))
        except Exception as exc:  # noqa: BLE001 -- any other exception is a bug the matrix must show
            return Cell("crash", f"{type(exc).__name__}: {_first_sentence(str(exc))}")
    said = [str(w.message) for w in caught if _from_lqc(w)]
    if not rel_error <= (EXACT_TOLERANCE if spec.exact else spec.bound):  # not finite counts as beyond
        return Cell("wrong", f"relative error {rel_error:.3g}", rel_error)
    if said:
        return Cell("falls back", _first_sentence(said[0].removeprefix("lqc").lstrip(" :")), rel_error)
    if not applied:
        return Cell("silent", "a pass changed nothing and said nothing", rel_error)
    return Cell("exact" if spec.exact else "within bound", "", rel_error)


_LQC_ROOT = str(Path(__file__).resolve().parent.parent)


def _from_lqc(warning) -> bool:
    """A warning lqc's own code gave (not torch's or transformers')."""
    filename = str(Path(warning.filename).resolve())
    return str(warning.message).startswith("lqc") or (filename.startswith(_LQC_ROOT) and "site-packages" not in filename)


def _run_graph(arch: str, recipe: Any, zeroed_attention: int | None = None, cache: bool = False) -> tuple[float, bool]:
    """The recipe's passes, then the CPU lowering, on a copy of the architecture's graph."""
    from lqc.data import calibration_from
    from lqc.lowering import lowering_passes
    from lqc.passes import PassContext, PassManager
    from lqc.recipes import resolve_recipe

    model, graph, ids, reference = traced(arch, cache)
    passes = recipe if isinstance(recipe, list) else resolve_recipe(recipe)["passes"]
    compressed = graph.copy(name=graph.name)
    calibration = calibration_from([_token_ids(128, seed)[0] for seed in CALIBRATION_SEEDS])
    ctx = PassContext(calibration=calibration, progress=False)
    report = PassManager(passes).run(compressed, ctx)
    PassManager(lowering_passes("eager", [ids])).run(compressed, ctx, report=report)
    with torch.no_grad():  # the logits among the outputs (a cache-writing graph also returns the cache)
        (logits,) = [t for t in compressed(ids) if isinstance(t, torch.Tensor) and t.shape == reference.shape]
    if zeroed_attention is not None and _all_applied(report.records):
        reference = _zeroed_attention_logits(arch, graph, zeroed_attention)
    return _relative_error(logits, reference), _all_applied(report.records)


def _zeroed_attention_logits(arch: str, graph, block: int) -> torch.Tensor:
    """The eager model's logits with the attention module of ``block`` returning zeros."""
    import copy

    model, _, ids, _ = traced(arch)
    (path,) = [r.path for r in graph.regions_of_kind("attention") if r.block == block]
    model = copy.deepcopy(model)
    model.get_submodule(path).forward = lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states), None)
    with torch.no_grad():
        return model(input_ids=ids, **({} if arch in ENCODERS else {"use_cache": False})).logits


# the passes that compress: each must match something, or warn why not. The exact rewrites
# (concat_linears, fold_norms, ...) find nothing to do on some families by design: one of them must.
COMPRESSING_PASSES = ("quantize", "lowrank", "route_neurons", "ffn_to_moe", "drop_layers", "compress_kv")


def _all_applied(records) -> bool:
    recipe = [r for r in records if r.stage == "recipe" and r.name != "cleanup"]
    compressing = [r for r in recipe if r.name in COMPRESSING_PASSES]
    if compressing:
        return all(r.matches > 0 for r in compressing)
    return not recipe or any(r.matches > 0 for r in recipe)


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.float() - reference).norm() / reference.norm())


def _first_sentence(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    sentence = re.split(r"(?<=\.)\s(?=[A-Z(])", text, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def measure(archs=None, columns=None, progress: bool = True) -> dict[tuple[str, str], Cell]:
    from tqdm.auto import tqdm

    pairs = [(a, c) for a in (archs or ARCHITECTURES) for c in (columns or COLUMNS)]
    return {(a, c): check_cell(a, c) for a, c in tqdm(pairs, desc="support matrix", disable=not progress)}


STATUSES = ("exact", "within bound", "falls back", "error")


def format_markdown(cells: dict[tuple[str, str], Cell], seconds: float) -> str:
    """docs/models.md's matrix: a status per cell, the reasons as numbered notes under it."""
    archs = list(dict.fromkeys(a for a, _ in cells))
    columns = list(dict.fromkeys(c for _, c in cells))
    notes: dict[str, int] = {}
    rows = ["| architecture | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for arch in archs:
        texts = []
        for column in columns:
            cell = cells[arch, column]
            text = cell.status
            if cell.reason and cell.status in ("falls back", "error"):
                number = notes.setdefault(cell.reason, len(notes) + 1)
                text += f" [{number}]"
            texts.append(text)
        rows.append(f"| {arch} | " + " | ".join(texts) + " |")
    lines = [BEGIN, *rows, "", "Notes (what lqc said):", ""]
    lines += [f"{n}. {reason.replace('|', '/')}" for reason, n in notes.items()]
    lines += ["", f"Measured by `python -m lqc.support_matrix --out docs/models.md` in {seconds:.0f} s.", END]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- support matrix: generated by python -m lqc.support_matrix -->", "<!-- end of support matrix -->"


def parse_markdown(text: str) -> dict[tuple[str, str], str]:
    """(architecture, column) -> the status docs/models.md claims."""
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    claims = {}
    for line in lines[2:]:
        arch, *texts = [c.strip() for c in line.strip("|").split("|")]
        for column, text in zip(columns, texts):
            claims[arch, column] = re.sub(r"\s*\[\d+\]$", "", text)
    return claims


def write_markdown(path: str, block: str) -> None:
    """Put the matrix into ``path``, between its markers (the prose around it is kept)."""
    target = Path(path)
    text = target.read_text() if target.is_file() else f"# Supported models\n\n{BEGIN}\n{END}\n"
    start, end = text.index(BEGIN), text.index(END) + len(END) + 1
    target.write_text(text[:start] + block + text[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="measure lqc's support matrix on tiny random models of each architecture")
    parser.add_argument("--out", default=None, help="a markdown file to write the matrix into (docs/models.md)")
    parser.add_argument("--archs", nargs="*", default=None, choices=list(ARCHITECTURES))
    parser.add_argument("--columns", nargs="*", default=None, choices=list(COLUMNS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # each cell records its own; the rest is transformers' noise here
    started = time.perf_counter()
    cells = measure(args.archs, args.columns)
    block = format_markdown(cells, time.perf_counter() - started)
    bad = {k: c for k, c in cells.items() if c.status in FAILURES}
    for (arch, column), cell in bad.items():
        print(f"BUG {arch} x {column}: {cell.status}: {cell.reason}")
    if args.out:
        write_markdown(args.out, block)
    else:
        print(block)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
