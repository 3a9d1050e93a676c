"""The compression levels ``lqc auto`` chooses from for each linear, and what each one costs.

A level is written like ``int4-g64``, ``int4-g128+eora16``, ``int8`` or ``float``: a format, an
int4 group size, and an optional rank of EoRA compensation (the lowrank pass). int4 levels use
one method for every layer (``gptq`` by default: act-order, Hessian-searched ranges, the
``int4-gptq`` recipe's settings; ``hqq`` and ``rtn`` need no calibration). Each level is computed
once for every linear by lqc's own passes on one capture of the model, so the weights the search
scores are the ones a recipe built from its choice produces (up to calibration statistics: a
recipe quantizes level after level, each on a graph the earlier levels already changed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lqc.ir import op_name, trace
from lqc.ir.errors import LqcConfigError
from lqc.ir.lqc_ops import qlinear_args
from lqc.passes import PassContext, PassManager
from lqc.runtime.quantization.lowrank import LowRankFactors

DEFAULT_LEVELS = ("int4-g128", "int4-g64", "int4-g64+eora16", "int8", "float")
METHODS = ("gptq", "hqq", "rtn")
_LEVEL = re.compile(r"^(?:(float)|(int8)|int4-g(32|64|128|256))(?:\+eora(\d+))?$")


@dataclass(frozen=True)
class Level:
    name: str
    format: str  # "float" | "int8" | "int4"
    group_size: int = 0
    rank: int = 0  # EoRA rank, 0 for none

    def quantize_entry(self, method: str, calibration_tokens: int) -> dict | None:
        """The quantize pass options of this level (None for float)."""
        if self.format == "float":
            return None
        if self.format == "int8":
            return {"pass": "quantize", "format": "int8"}
        entry = {"pass": "quantize", "format": "int4", "group_size": self.group_size, "method": method}
        if method == "gptq":
            entry.update(act_order=True, gptq_params="mse", calibration_tokens=calibration_tokens)
        return entry


def parse_level(text: str) -> Level:
    match = _LEVEL.match(text.strip())
    if match is None or (match.group(1) and match.group(4)):
        raise LqcConfigError(f"unknown compression level {text!r}: write float, int8 or int4-g32/64/128/256, "
                             f"optionally with +eoraR (e.g. int4-g64+eora16)")
    fmt = "float" if match.group(1) else "int8" if match.group(2) else "int4"
    return Level(text.strip(), fmt, int(match.group(3) or 0), int(match.group(4) or 0))


@dataclass
class LevelTable:
    """Per level and linear: the weight it computes with (float32) and the bytes it stores."""

    levels: list[Level]
    units: list[str]  # the linears' module paths, in graph order
    weights: dict[str, dict[str, torch.Tensor]]  # level name -> unit -> effective float32 weight
    nbytes: dict[str, dict[str, int]]  # level name -> unit -> stored bytes (weight, scales, factors)
    float_weights: dict[str, torch.Tensor]  # unit -> the model's own weight

    def ordered(self) -> list[Level]:
        """Levels from the fewest bytes to the most (summed over every unit)."""
        return sorted(self.levels, key=lambda lv: sum(self.nbytes[lv.name].values()))


@torch.no_grad()
def build_levels(model: torch.nn.Module, example_ids: torch.Tensor, calibration, levels: list[Level], *,
                 method: str = "gptq", calibration_tokens: int = 8192, progress: bool = True) -> LevelTable:
    """Every level of every block linear (the lm_head excluded), by lqc's quantize and lowrank
    passes on one capture of ``model`` at ``example_ids``' shape."""
    if method not in METHODS:
        raise LqcConfigError(f"int4 method {method!r}: use one of {', '.join(METHODS)}")
    base = trace(model, example_ids, use_cache=False)
    float_weights = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    for level in levels:
        entry = level.quantize_entry(method, calibration_tokens)
        if entry is None:
            continue
        graph = base.copy(name=level.name)
        recipe = [{**entry, "kernels": False}]
        if level.rank:
            recipe.append({"pass": "lowrank", "rank": level.rank, "calibration_tokens": calibration_tokens})
        PassManager(recipe).run(graph, PassContext(calibration=calibration, progress=progress))
        weights[level.name], nbytes[level.name] = {}, {}
        for node in graph.nodes:
            info = node.meta.get("lqc_quantized")
            if op_name(node) != "lqc::qlinear" or info is None:
                continue
            effective = info["canonical"].dequantize(torch.float32)
            stored = info["canonical"].nbytes()
            args = qlinear_args(node)
            if args["lowrank_a"] is not None:
                factors = LowRankFactors(*(graph.constant(args[k]) if args[k] is not None else None
                                           for k in ("lowrank_a", "lowrank_b", "lowrank_scale")))
                effective, stored = effective + factors.product(), stored + factors.nbytes()
            weights[level.name][info["layer"]], nbytes[level.name][info["layer"]] = effective, stored
            float_weights.setdefault(info["layer"], info["float_weight"])
    units = list(float_weights)
    if not units:
        raise LqcConfigError("lqc auto: the model has no linear layer the quantize pass can take")
    for level in levels:
        if level.format == "float":
            weights[level.name] = {u: float_weights[u].to(torch.float32) for u in units}
            nbytes[level.name] = {u: float_weights[u].nbytes for u in units}
    return LevelTable(list(levels), units, weights, nbytes, float_weights)
