"""``lowrank``: a rank-r error-compensation path on every quantized linear (EoRA).

After ``quantize``, each ``lqc::qlinear`` computes ``x @ Wq.T`` instead of ``x @ W.T``. This pass
measures the second moment ``H = E[x x^T]`` of each qlinear's input on calibration tokens (run
through the graph as it is now, so upstream quantization is what the layer sees) and fits factors
B [N, r], A [r, K] that minimize ``E || x @ (W - Wq - B A).T ||^2`` in closed form
(lqc.runtime.quantization.lowrank.eora_factors). The factors ride on the same qlinear node (its
``lowrank_a``/``lowrank_b``/``lowrank_scale`` operands): one op, which adds
``((x @ A.T) @ B.T) * scale`` to its result.

Stored int8 by default (r (N + K) bytes plus N scales a layer: ~8% of an int4 g64 layer at r=16
on a 576 x 1536 projection); ``storage: bf16`` doubles that. A qlinear whose float weight the
quantize pass did not keep (scale-migrated by AWQ or SmoothQuant) is left as it is, warned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.lqc_ops import has_lowrank, qlinear_args
from lqc.ir.provenance import derived_from
from lqc.runtime.quantization.lowrank import LowRankFactors, eora_factors, input_root, store_factors

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.quantization.activation_stats import collect_input_stats
from lqc.passes.registry import register_pass


@dataclass
class LowRankOptions(PassOptions):
    rank: int = field(default=16, metadata={"help": "rank r of each compensation path"})
    storage: Literal["int8", "bf16"] = field(default="int8", metadata={"help": "how the factors are stored (int8: per-row scales)"})
    calibration_tokens: int = field(default=8192, metadata={"help": "calibration tokens the input second moments are measured on"})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LqcConfigError(f"pass 'lowrank': rank is {self.rank}; it must be a positive integer, e.g. 16")


@dataclass
class LowRankReport:
    layers: list[dict] = field(default_factory=list)  # {"layer", "rank", "bytes", "error_before", "error_after"}
    skipped: list[str] = field(default_factory=list)  # qlinears without a kept float weight

    @property
    def factor_bytes(self) -> int:
        return sum(row["bytes"] for row in self.layers)

    def summary(self) -> str:
        if not self.layers:
            return "no quantized linear compensated"
        kept = sum(r["error_after"] for r in self.layers) / max(sum(r["error_before"] for r in self.layers), 1e-30)
        return (f"{len(self.layers)} layers, rank {self.layers[0]['rank']}, {self.factor_bytes / 1e6:.2f} MB of factors; "
                f"output error energy {kept:.1%} of before")


@register_pass
class LowRank(Pass):
    name = "lowrank"
    description = "add a rank-r error-compensation path to each quantized linear, fitted in the inputs' eigenspace (EoRA; calibrated)"
    Options = LowRankOptions
    requires = frozenset({"calibration"})

    def run(self, graph: Graph, ctx) -> PassResult:
        report = LowRankReport()
        nodes = []
        for node in graph.nodes:
            if op_name(node) != "lqc::qlinear" or "lqc_quantized" not in node.meta or not self.selects(node):
                continue
            if node.meta["lqc_quantized"].get("float_weight") is None:
                report.skipped.append(node.meta["lqc_quantized"]["layer"])
            elif not has_lowrank(node):
                nodes.append(node)
        if report.skipped:
            warnings.warn(f"lqc lowrank: {len(report.skipped)} quantized linears have no float weight in their input's "
                          f"coordinates (scale-migrated by awq or smoothquant), left without compensation: "
                          f"{', '.join(report.skipped[:4])}{' ...' if len(report.skipped) > 4 else ''}", stacklevel=2)
        if not nodes and not report.skipped:
            warnings.warn("lowrank: no quantized linear to compensate: put the lowrank pass after a quantize pass "
                          "(e.g. [{pass: quantize, format: int4}, {pass: lowrank, rank: 16}])", stacklevel=2)
        if not nodes:
            return PassResult(matches=0, details=report)
        hessians, roots = self._hessians(graph, ctx, nodes), {}

        def fit(node: fx.Node, info: dict):
            x = qlinear_args(node)["x"].name
            if x not in roots:  # q/k/v (and gate/up) share an input: one factorization
                roots[x] = input_root(hessians()[x])
            return self._fit(info, hessians()[x], roots[x])

        for node in nodes:
            info = node.meta["lqc_quantized"]
            factors, before, after = ctx.transform(
                graph, ("eora", info["layer"]), [qlinear_args(node)["qweight"]], lambda node=node, info=info: fit(node, info))
            self._attach(graph, node, factors, info["layer"])
            report.layers.append({"layer": info["layer"], "rank": factors.rank, "bytes": factors.nbytes(),
                                  "error_before": before, "error_after": after})
        return PassResult(matches=len(report.layers), details=report)

    def _hessians(self, graph: Graph, ctx, nodes: list[fx.Node]):
        """``hessians()``: input second moments by input node name, measured for all nodes on the
        first call (only a layer the transform cache lacks asks)."""
        cache: dict = {}

        def hessians() -> dict:
            if not cache:
                inputs = ctx.calibration_inputs(graph, tokens=self.options.calibration_tokens)
                stats = collect_input_stats(graph, inputs, [qlinear_args(n)["x"] for n in nodes], max_samples=0,
                                            progress=ctx.progress)
                cache.update({name: s.mean_hessian for name, s in stats.items()})
            return cache

        return hessians

    def _fit(self, info: dict, hessian: torch.Tensor, root: torch.Tensor) -> tuple[LowRankFactors, float, float]:
        """The stored factors, and the output error energy ``tr(dW H dW^T)`` before and after."""
        weight = info["float_weight"].to(torch.float32)
        delta = weight - info["canonical"].dequantize(torch.float32)
        b, a = eora_factors(delta, hessian, self.options.rank, root)
        factors = store_factors(b, a, self.options.storage)
        h = hessian.to(torch.float32)
        energy = lambda d: float(((d @ h) * d).sum())  # noqa: E731
        return factors, energy(delta), energy(delta - factors.product())

    @staticmethod
    def _attach(graph: Graph, node: fx.Node, factors: LowRankFactors, layer: str) -> None:
        fqns = graph.fqns(qlinear_args(node)["qweight"])
        with derived_from(graph, [node]):
            a = graph.add_constant(factors.a, f"{layer}.lowrank_a", fqns, before=node)
            b = graph.add_constant(factors.b, f"{layer}.lowrank_b", fqns, before=node)
            scale = graph.add_constant(factors.scale, f"{layer}.lowrank_scale", fqns, before=node) if factors.scale is not None else None
        node.args = (*node.args[:9], a, b, scale)
