"""``lqc.compress(model, recipe, calibration=...)``: compress ahead of time, get a module back.

The returned module is a shallow copy of ``model`` (same parameters, the original is left
untouched) whose ``forward`` runs through the lqc backend. Compression happens here, on one
capture of the model: calibration runs now, on full calibration windows, and every weight
transform lands in the transform cache. Later shapes (each prompt length, decode steps) are new
dynamo graphs that reuse those cached transforms, so they cost a graph rewrite, not a
recalibration. ``generate()`` works on the result as on the original; when ``drop_layers``
dropped attention layers, the caches it builds hold nothing for them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from lqc.ir.errors import LqcConfigError, LqcError
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
    calibration_data = calibration_from(calibration, tokenizer)
    options = CompileOptions.parse(
        dict(recipe=recipe, calibration=calibration_data, tokenizer=tokenizer, target=target,
             verify=verify, debug_dir=debug_dir, progress=progress, viz=viz, autotune=autotune)
    )
    session = Session(options)
    compressed = copy.copy(model)  # shares modules and parameters; only `forward` differs
    compressed.forward = torch.compile(model.forward, backend=session)
    if example_inputs is None:
        tokens = calibration_data.default_length if calibration_data is not None else 16
        example_inputs = example_token_ids(model, calibration_data, tokens, "lqc.compress")
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
    return {path: info for report in reports for record in report.records if record.name == "drop_layers"
            for path, info in record.details.dropped_modules.items()}


def dropped_attention_layers(dropped: dict[str, dict]) -> list[int]:
    """The blocks whose attention was dropped: their KV cache slots need no memory."""
    return sorted({info["block"] for info in dropped.values() if info["kind"] == "attention"})
