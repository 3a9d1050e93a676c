"""What the quantize pass reports (its ``PassResult.details``): one row per quantized (or kept)
layer, the layers it skipped, and the choices its methods made."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerRow:
    layer: str  # module path; experts: "<ffn>.experts.w_in" (w_gate, w_out); tables: the embedding
    shape: list[int]
    bytes_before: int
    bytes_after: int  # the canonical form's bytes (a target's layout may differ: see pack_cpu_layouts)
    kind: str = "linear"  # "linear", "experts" (an lqc::moe_ffn weight, int8 by round to nearest) or "embedding"
    kept: str | None = None  # keep_sensitive: the layer stayed in this format ("int8" or "float")


@dataclass
class MigrationGroup:
    """AWQ or SmoothQuant: one group of linears sharing an input."""

    layers: list[str]
    alpha: float | None  # the migration strength chosen (None: no producer took the scales)
    scales_into: str | None  # what absorbed 1/s: a norm weight, rows of a linear, or None
    unclipped: list[str]  # layers feeding attention scores: min/max ranges, no clipping search


@dataclass
class QuantizeReport:
    format: str
    method: str
    group_size: int
    layers: list[LayerRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # widths the group does not divide, with pad: false
    sensitivity: list[dict] = field(default_factory=list)  # keep_sensitive: [{"layer", "rel_error"}], worst first
    migration: list[MigrationGroup] = field(default_factory=list)  # awq / smoothquant groups

    @property
    def quantized(self) -> list[LayerRow]:
        """The rows of layers stored in a quantized format (not those kept in float)."""
        return [row for row in self.layers if row.kept != "float"]
