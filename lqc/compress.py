"""``lqc.compress(model, recipe, calibration=...)``: compress ahead of time, get a module back.

The returned module is a shallow copy of ``model`` (same parameters, the original is left
untouched) whose ``forward`` runs through the lqc backend. Compression happens here, on one
capture of the model: calibration runs now, on full calibration windows, and every weight
transform lands in the transform cache. Later shapes (each prompt length, decode steps) are new
dynamo graphs that reuse those cached transforms, so they cost a graph rewrite, not a
recalibration. ``generate()`` works on the result as on the original; when ``drop_layers``
dropped attention layers, the caches it builds hold nothing for them.

Inputs are checked before anything compiles (``check_model``, ``check_prompt``): a model in
training mode, on the meta device, spread over several devices or with weights in a dtype lqc
does not compress (float8, ...) is refused, and so are example token ids that are empty, not
integers, outside the vocabulary, longer than the model's positions or on another device.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from lqc.ir.errors import LqcConfigError, LqcError
from lqc.runtime.compiled import check_token_ids
from lqc.runtime.structural.dropped_layers import keep_dropped_layers_out_of_caches

from .data import calibration_from, example_token_ids
from .options import CompileOptions
from .pipeline import Session


def compress(
    model: torch.nn.Module,
    recipe: Any = "default",
    *,
    calibration: Any = None,
    tokenizer: Any = None,
    target: str = "eager",
    verify: bool = False,
    debug_dir: str | None = None,
    example_inputs: torch.Tensor | None = None,
    progress: bool = True,
    viz: bool = False,
    autotune: bool | None = None,
) -> torch.nn.Module:
    """Compress ``model`` with ``recipe`` and return the compressed module.

    ``example_inputs``: token ids for the ahead-of-time capture (default: the first calibration
    window, else 16 random tokens). ``target`` defaults to "eager" here: no Inductor compile per
    new shape; pass "auto" for speed. ``viz``: keep what ``lqc.viz`` draws (see lqc.viz.report).
    ``autotune``: at target "triton", tune the kernels' launch configs (default: on a GPU only).
    """
    check_model(model, "lqc.compress")
    if model.training:
        # dynamo would capture dropout and batch-norm statistics as in training, and lqc compresses
        # inference graphs (the backend falls back to Inductor for a graph traced with autograd on)
        raise LqcConfigError("lqc.compress: the model is in training mode (dropout on, batch norm updating its "
                             "statistics); call model.eval() first, or torch.compile it for training without lqc")
    calibration_data = calibration_from(calibration, tokenizer)
    options = CompileOptions.parse(
        dict(recipe=recipe, calibration=calibration_data, tokenizer=tokenizer, target=target,
             verify=verify, debug_dir=debug_dir, progress=progress, viz=viz, autotune=autotune)
    )
    session = Session(options)
    compressed = copy.copy(model)  # shares modules and parameters; only `forward` differs
    compressed.forward = torch.compile(model.forward, backend=session)
    example_inputs = _example_inputs(model, calibration_data, example_inputs)
    with torch.no_grad():
        try:
            compressed(example_inputs)  # compile now: calibrate and transform weights ahead of time
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            if isinstance(exc.inner_exception, LqcConfigError):
                raise exc.inner_exception from None  # a configuration error reads best without dynamo's wrapping
            raise
    if not session.compilations:
        # dynamo ran the forward without calling the backend: it gave up on compiling it
        raise LqcError(
            f"lqc.compress: dynamo compiled no graph for this model's forward, so nothing was compressed. It stops "
            f"after torch._dynamo.config.recompile_limit ({torch._dynamo.config.recompile_limit}) compilations of one "
            f"function: call torch._dynamo.reset() between compressions in one process, or raise the limit"
        )
    compressed._lqc_compression = Compression(recipe=options.recipe, target=target, session=session)
    # a dropped attention layer needs no KV cache: generate() builds its caches without those slots
    keep_dropped_layers_out_of_caches(compressed, compressed._lqc_compression.dropped_attention_layers)
    return compressed


def _example_inputs(model: torch.nn.Module, calibration_data, example_inputs: torch.Tensor | None) -> torch.Tensor:
    """The ids the ahead-of-time capture runs on, checked: the user's, or the first calibration
    window (at most the model's positions), or 16 random ids."""
    where = "lqc.compress(example_inputs=...)"
    if example_inputs is None:
        tokens = calibration_data.default_length if calibration_data is not None else 16
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        tokens = min(tokens, positions) if isinstance(positions, int) else tokens  # a window the model can run
        example_inputs = example_token_ids(model, calibration_data, tokens, "lqc.compress")
        where = "lqc.compress (its example ids: the first calibration window)" if calibration_data is not None else where
    if embedding_rows(model) is not None:  # a model of token ids (an image model takes pixel values)
        check_prompt(model, example_inputs, where)
    return example_inputs


# the weight dtypes lqc's passes and kernels handle; float8 and other narrow formats are not compressed further
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_model(model: torch.nn.Module, caller: str) -> torch.device | None:
    """The one device all of ``model``'s weights are on (None: it has none); LqcConfigError for
    weights that were never loaded (meta), weights spread over devices, or an unsupported dtype."""
    if not isinstance(model, torch.nn.Module):
        raise LqcConfigError(f"{caller} takes a torch.nn.Module; got {type(model).__name__}. For a plain function, "
                             f"use torch.compile(fn, backend='lqc')")
    devices = set()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.device.type == "meta":
            raise LqcConfigError(
                f"{caller}: {name} is on the meta device (the model's weights were never loaded), so there is nothing "
                f"to compress. Load real weights first: from_pretrained(...) without device_map='meta', or "
                f"model.to_empty(device='cpu') followed by model.load_state_dict(...)")
        if tensor.is_floating_point() and tensor.dtype not in WEIGHT_DTYPES:
            raise LqcConfigError(
                f"{caller}: {name} is {tensor.dtype}; lqc compresses weights in float32, float16, bfloat16 or float64. "
                f"Load the model in one of those (e.g. model.to(torch.bfloat16)) and let a recipe quantize it")
        devices.add(tensor.device)
    if len(devices) > 1:
        raise LqcConfigError(
            f"{caller}: the model's weights are spread over {', '.join(sorted(map(str, devices)))}; lqc compiles a "
            f"model on one device. Move it there first (model.to('cuda') or model.to('cpu')), without device_map='auto'")
    return devices.pop() if devices else None


def embedding_rows(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding table (its vocabulary); None for a model that takes no
    token ids (an image classifier) or hides its embedding."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embedding.num_embeddings if isinstance(embedding, torch.nn.Embedding) else None


def check_prompt(model: torch.nn.Module, ids: Any, where: str, new_tokens: int = 0) -> None:
    """LqcConfigError unless ``ids`` are token ids [batch, tokens] that ``model`` can run: integers,
    at least one token, inside its vocabulary, on its device, and (with ``new_tokens`` to come)
    no longer than its positions (config.max_position_embeddings)."""
    check_token_ids(ids, embedding_rows(model), where)
    if ids.dim() != 2:
        hint = "ids[None]" if ids.dim() == 1 else "ids.reshape(batch, tokens)"
        raise LqcConfigError(f"{where}: token ids must be [batch, tokens]; got shape {tuple(ids.shape)}. Pass {hint}")
    device = next(itertools.chain(model.parameters(), model.buffers()), ids).device
    if ids.device != device:
        raise LqcConfigError(f"{where}: token ids are on {ids.device} but the model is on {device}; "
                             f"move them with ids.to({str(device)!r})")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and ids.shape[1] + new_tokens > positions:
        also, fewer = (f" plus {new_tokens} new tokens", "a shorter prompt or a smaller max_new_tokens") if new_tokens \
            else ("", f"ids[:, :{positions}]")
        raise LqcConfigError(f"{where}: {ids.shape[1]} tokens{also} exceed the model's {positions} positions "
                             f"(config.max_position_embeddings); pass at most {positions} tokens in all ({fewer}), "
                             f"or split the text into windows")


@dataclass
class Compression:
    """How a module returned by ``compress`` was made: the recipe, and the session whose
    compilations hold the graphs (the first capture's is what lqc.save writes)."""

    recipe: Any
    target: str
    session: Session | None = None

    @property
    def graphs(self) -> list:
        return self.session.graphs if self.session is not None else []

    @property
    def dropped_modules(self) -> dict:
        """Module path -> {kind, block}: what drop_layers dropped, in any graph of the session."""
        return dropped_modules(self.session.reports) if self.session is not None else {}

    @property
    def dropped_attention_layers(self) -> list[int]:
        return dropped_attention_layers(self.dropped_modules)


def dropped_modules(reports) -> dict[str, dict]:
    """Module path -> {kind, block} of everything drop_layers dropped in these graph reports."""
    return {path: info for report in reports for record in report.records
            if record.name == "drop_layers" and record.details is not None  # None: it kept every layer, warned
            for path, info in record.details.dropped_modules.items()}


def dropped_attention_layers(dropped: dict[str, dict]) -> list[int]:
    """The blocks whose attention was dropped: their KV cache slots need no memory."""
    return sorted({info["block"] for info in dropped.values() if info["kind"] == "attention"})
