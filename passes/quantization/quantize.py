"""``quantize``: linear layers -> ``lqc::qlinear`` with packed weights.

Formats (see lqc.runtime.quantization.formats): ``int8`` weight-only per channel; ``int4`` weight-only,
group-wise asymmetric; ``w8a8`` int8 weights with int8 activations quantized per token at run
time; ``fp8`` e4m3 weights with a per-channel scale; ``fp8_dyn`` those, with e4m3 activations
quantized per token at run time. Methods choose the quantization parameters:
``rtn`` (round to nearest, min/max) and ``hqq`` (optimized zero points) need no data; ``gptq``
and ``awq`` calibrate. ``smoothquant: true`` migrates activation outliers into the weights
before w8a8 quantization (lqc.passes.quantization.smoothquant).

Every weight is transformed once per model and recipe through the transform cache, so each
recompiled graph (prefill, decode...) reuses it. Embeddings are never touched and the lm_head is
left alone unless ``include_lm_head``. A width the group size does not divide is padded with zero
columns (exact), or with ``pad: false`` the layer is skipped with a warning. A weight holding NaN
or inf is an error naming the layer.

The pass emits the canonical form only (``lqc::qlinear`` in fmt int8 / int4 / w8a8 / fp8 / fp8_dyn)
and records ``kernels`` in each node's ``meta["lqc_quantized"]``: at targets eager and inductor
the ``pack_cpu_layouts`` lowering (lqc.passes.lowering) then lays weights on the CPU out for
torch's packed CPU matmuls, which compute in bfloat16: fast, and as accurate as a bfloat16 model.
``kernels: false`` keeps the reference layout: exact dequantize-then-matmul in the activations' dtype.

One handler per family: round to nearest, HQQ and GPTQ per weight (weights.py), AWQ and
SmoothQuant per group of linears sharing an input (migration.py), keep_sensitive (sensitivity.py),
MoE experts (experts.py) and embedding tables (tables.py). This class keeps the options, the
choice of sites and the dispatch; ``details`` is a QuantizeReport (report.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.linear import LinearSite, linear_sites
from lqc.ir.provenance import derived_from
from lqc.runtime.quantization.formats import QuantizedWeight

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.quantization.activation_stats import collect_input_stats
from lqc.passes.quantization.experts import quantize_experts
from lqc.passes.quantization.migration import migrate
from lqc.passes.quantization.report import LayerRow, QuantizeReport
from lqc.passes.quantization.sequential_stats import SequentialInputStats
from lqc.passes.quantization.sensitivity import keep_sensitive, kept_format
from lqc.passes.quantization.tables import quantize_tables
from lqc.passes.quantization.weights import quantize_weight
from lqc.passes.registry import register_pass

GROUP_SIZES = (32, 64, 128, 256)
CALIBRATED_METHODS = ("gptq", "awq")


@dataclass
class QuantizeOptions(PassOptions):
    method: Literal["rtn", "hqq", "gptq", "awq"] = field(default="rtn", metadata={"help": "how quantization parameters are chosen (gptq and awq need calibration)"})
    format: Literal["int8", "int4", "w8a8", "fp8", "fp8_dyn"] = field(default="int8", metadata={"help": "weight (and activation) format"})
    group_size: int = field(default=64, metadata={"help": "int4: inputs per scale and zero (32, 64, 128 or 256)"})
    pad: bool = field(default=True, metadata={"help": "pad widths the group size does not divide (else skip the layer, warned)"})
    include_lm_head: bool = field(default=False, metadata={"help": "quantize the lm_head too"})
    include_embedding: bool = field(default=False, metadata={"help": "store embedding tables as int8 rows with a per-row scale"})
    kernels: bool = field(default=True, metadata={"help": "use torch's packed CPU kernels (bfloat16 compute) where shapes allow (the pack_cpu_layouts lowering)"})
    activations: Literal["bf16", "int8"] = field(
        default="bf16", metadata={"help": "int4 on the CPU: bf16 activations (torch's int4 kernel) or int8 with one scale per token (lqc's AVX-512 VNNI kernel: ~2x faster decode)"}
    )
    zero_point: Literal["float", "integer", "symmetric"] = field(
        default="float", metadata={"help": "int4 zero points: any float (lqc's kernels), integer multiples of the scale (what compressed-tensors/vLLM store; lqc export), or none (symmetric)"}
    )
    hqq_iters: int = field(default=20, metadata={"help": "hqq: optimization steps"})
    damp: float = field(default=0.01, metadata={"help": "gptq: Hessian damping, a fraction of its mean diagonal"})
    act_order: bool = field(default=False, metadata={"help": "gptq: quantize columns by decreasing Hessian diagonal (static groups)"})
    block_size: int = field(default=128, metadata={"help": "gptq: columns per block of lazy updates"})
    calibration_tokens: int = field(default=16384, metadata={"help": "gptq, awq: calibration tokens the statistics are collected on"})
    awq_grid: int = field(default=20, metadata={"help": "awq: points of the scale exponent grid in [0, 1)"})
    awq_samples: int = field(default=512, metadata={"help": "awq: calibration rows the scale and clipping searches use"})
    awq_gptq: bool = field(default=False, metadata={"help": "awq: quantize the scaled weights with GPTQ instead of the clipping search"})
    gptq_params: Literal["minmax", "clip", "mse"] = field(
        default="minmax", metadata={"help": "gptq int4: static group parameters from min/max, the clipping search on sampled rows (clip), or the range search on the full Hessian (mse)"}
    )
    gptq_refit: bool = field(
        default=False, metadata={"help": "gptq int4: after the codes are chosen, refit each row's group scales and zeros to them by least squares on the Hessian"}
    )
    refit_rounds: int = field(
        default=1, metadata={"help": "gptq_refit: rounds of refit, then GPTQ again on the refitted parameters (each row keeps its best round)"}
    )
    sequential: bool = field(
        default=False, metadata={"help": "gptq: each layer's statistics on the outputs of the layers quantized before it (still one forward)"}
    )
    mse_search: Literal["grid", "coordinate"] = field(
        default="grid", metadata={"help": "gptq_params mse: all 8 x 8 low/high shrink ratios (grid), or the low end then the high end (coordinate: 4x less search work)"}
    )
    keep_sensitive: int = field(default=0, metadata={"help": "keep the k layers whose lone quantization moves the output most in higher precision (needs calibration)"})
    keep_format: Literal["auto", "int8", "float"] = field(default="auto", metadata={"help": "keep_sensitive: their format (auto: int8 under int4, else float)"})
    sensitivity_tokens: int = field(default=1024, metadata={"help": "keep_sensitive: calibration tokens the ranking is measured on"})
    smoothquant: bool = field(default=False, metadata={"help": "w8a8: migrate activation outliers into the weights first (needs calibration)"})
    smooth_alpha: float | None = field(default=None, metadata={"help": "smoothquant: migration strength in (0, 1); null searches a grid per group"})

    def __post_init__(self) -> None:
        if self.format == "int4" and self.group_size not in GROUP_SIZES:
            raise LqcConfigError(f"quantize.group_size must be one of {', '.join(map(str, GROUP_SIZES))} for int4; got {self.group_size}")
        if self.method == "hqq" and self.format != "int4":
            raise LqcConfigError(f"method 'hqq' optimizes int4 zero points; use format 'int4' (got {self.format!r})")
        if self.method == "hqq" and self.zero_point == "symmetric":
            raise LqcConfigError("method 'hqq' optimizes int4 zero points, which zero_point 'symmetric' removes; use method rtn, gptq or awq")
        if self.method == "gptq" and self.format not in ("int4", "int8"):
            raise LqcConfigError(f"method 'gptq' quantizes int4 or int8 weights; got format {self.format!r}")
        if self.gptq_refit and (self.method != "gptq" and not self.awq_gptq or self.format != "int4"):
            raise LqcConfigError(f"quantize.gptq_refit refits the group parameters of GPTQ's int4 codes: use method 'gptq' and format 'int4' (got {self.method!r}, {self.format!r})")
        if self.refit_rounds < 1 or (self.refit_rounds > 1 and not self.gptq_refit):
            raise LqcConfigError(f"quantize.refit_rounds counts gptq_refit's rounds: at least 1, and more than 1 only with gptq_refit: true (got {self.refit_rounds})")
        if self.sequential and (self.method != "gptq" or self.awq_gptq):
            raise LqcConfigError(f"quantize.sequential collects GPTQ's statistics layer by layer: use method 'gptq' (got {self.method!r})")
        if self.method == "awq" and self.format != "int4":
            raise LqcConfigError(f"method 'awq' quantizes int4 weights; got format {self.format!r}")
        if self.activations == "int8" and self.format != "int4":
            raise LqcConfigError(f"activations: int8 applies to int4 weights; got format {self.format!r}. For int8 weights "
                                 f"with int8 activations use format 'w8a8' (lqc's VNNI kernel on the CPU)")
        if self.smoothquant and (self.format != "w8a8" or self.method != "rtn"):
            raise LqcConfigError(
                f"smoothquant smooths int8 activations: use format 'w8a8' with method 'rtn' (got {self.format!r}, {self.method!r})"
            )
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise LqcConfigError(f"quantize.smooth_alpha must lie in (0, 1), or be null to search; got {self.smooth_alpha}")


@register_pass
class Quantize(Pass):
    name = "quantize"
    description = "linear layers -> lqc::qlinear with int8 / int4 / w8a8 / fp8 (/ fp8_dyn) packed weights (rtn, hqq, gptq, awq)"
    Options = QuantizeOptions

    def requirements(self) -> frozenset[str]:
        opts = self.options
        if opts.method in CALIBRATED_METHODS or opts.smoothquant or opts.keep_sensitive:
            return frozenset({"calibration"})
        return self.requires

    def run(self, graph: Graph, ctx) -> PassResult:
        opts = self.options
        report = QuantizeReport(format=opts.format, method=opts.method, group_size=opts.group_size)
        sites = self._sites(graph, report)
        kept = {}
        if opts.keep_sensitive:
            report.sensitivity, kept = keep_sensitive(opts, graph, ctx, sites)
        sites = [site for site in sites if site.name(graph) not in kept]
        input_stats = self._input_stats(graph, ctx, sites)
        migrated = {}
        if opts.method == "awq" or opts.smoothquant:
            migrated, report.migration = migrate(opts, graph, ctx, sites, input_stats)
        quantized = {}  # all computed before any rewrite: sequential statistics run the graph as it was
        order = input_stats.order(sites) if opts.sequential else sites  # inputs first to last
        for site in order:
            name, weight = site.name(graph), site.weight_tensor(graph)
            quantized[name] = migrated.get(name) or ctx.transform(
                graph, ("weight", name), [site.weight],
                lambda site=site, weight=weight: quantize_weight(opts, weight, lambda: input_stats(site)),
            )
            if opts.sequential:  # the layers after it run on its quantized weight
                input_stats.quantized(site, quantized[name].dequantize())
        for site in sites:
            name, weight, q = site.name(graph), site.weight_tensor(graph), quantized[site.name(graph)]
            report.layers.append(LayerRow(name, list(weight.shape), graph.constant(site.weight).nbytes, q.nbytes()))
            node = rewrite_qlinear(graph, site, q, name, opts.kernels, opts.activations)
            # what the lowrank pass compensates against: the float weight in the coordinates of the
            # qlinear's input (none for a scale-migrated one, whose scaled float weight is not kept)
            node.meta["lqc_quantized"]["float_weight"] = None if name in migrated else weight
        for name, (site, q) in kept.items():
            shape, bytes_before = list(site.weight_tensor(graph).shape), graph.constant(site.weight).nbytes
            if q is not None:  # int8 under int4: rewritten like any layer, in its own format
                rewrite_qlinear(graph, site, q, name, opts.kernels, opts.activations)
            report.layers.append(LayerRow(name, shape, bytes_before, q.nbytes() if q else bytes_before, kept=kept_format(opts)))
        report.layers += quantize_experts(opts, graph, ctx, self.selects)
        if opts.include_embedding:
            qlinears = [n for n in graph.nodes if op_name(n) == "lqc::qlinear" and "lqc_quantized" in n.meta]
            report.layers += quantize_tables(graph, ctx, self.selects, qlinears)
        return PassResult(matches=len(report.quantized), details=report)

    def _sites(self, graph: Graph, report: QuantizeReport) -> list[LinearSite]:
        """The selected linears (the lm_head only with include_lm_head), checked: a weight with
        NaN or inf is an error; a width the group does not divide is skipped without ``pad``."""
        opts = self.options
        lm_head_nodes = {name for r in graph.regions_of_kind("lm_head") for name in r.nodes}
        sites = []
        for site in linear_sites(graph):
            if not self.selects(site.node) or (site.node.name in lm_head_nodes and not opts.include_lm_head):
                continue
            name = site.name(graph)
            weight = site.weight_tensor(graph)
            if not torch.isfinite(weight).all():
                raise LqcConfigError(f"the weight of {name} contains NaN or inf; fix the model before quantizing it")
            if opts.format == "int4" and weight.shape[1] % opts.group_size and not opts.pad:
                report.skipped.append(name)
                warnings.warn(
                    f"quantize: {name} has {weight.shape[1]} inputs, not a multiple of group_size {opts.group_size}; "
                    f"left unquantized (pad: true would pad it)",
                    stacklevel=3,
                )
                continue
            sites.append(site)
        return sites

    def _input_stats(self, graph: Graph, ctx, sites: list[LinearSite]):
        """``input_stats(site)``: the calibration statistics of a site's input, collected for all
        sites at once on the first call (only a weight the transform cache lacks makes one)."""
        opts = self.options
        if opts.sequential:
            return SequentialInputStats(graph, lambda: ctx.calibration_inputs(graph, tokens=opts.calibration_tokens), sites,
                                        want_hessian=True, progress=ctx.progress)
        stats: dict = {}

        def input_stats(site: LinearSite):
            if not stats:
                stats.update(collect_input_stats(
                    graph, ctx.calibration_inputs(graph, tokens=opts.calibration_tokens), [s.x for s in sites],
                    max_samples=opts.awq_samples if (opts.method == "awq" or opts.gptq_params == "clip" or opts.smoothquant) else 0,
                    want_hessian=opts.method == "gptq" or opts.awq_gptq, progress=ctx.progress,
                ))
            return stats[site.x.name]

        return input_stats


def rewrite_qlinear(graph: Graph, site: LinearSite, q: QuantizedWeight, name: str, kernels: bool,
                    activations: str = "bf16") -> fx.Node:
    """``site`` -> ``lqc::qlinear`` on the canonical constants of ``q``. ``meta["lqc_quantized"]``
    keeps what lowerings and lqc.save need: the layer, the canonical weight and ``kernels``."""
    fqns = graph.fqns(site.weight)
    g = graph.gm.graph
    with derived_from(graph, [site.node, site.weight]):
        qweight = graph.add_constant(q.qweight, f"{name}.qweight", fqns, before=site.node)
        scales = graph.add_constant(q.scales, f"{name}.scales", fqns, before=site.node)
        zeros = graph.add_constant(q.zeros, f"{name}.zeros", fqns, before=site.node) if q.zeros is not None else None
        with g.inserting_before(site.node):
            new = g.call_function(
                torch.ops.lqc.qlinear.default,
                (site.x, qweight, scales, zeros, site.bias, q.format, q.group_size, q.in_features, q.out_features),
            )
    new.meta["lqc_quantized"] = {"layer": name, "format": q.format, "canonical": q, "kernels": kernels,
                                 "activations": activations}
    site.node.replace_all_uses_with(new)
    g.erase_node(site.node)
    return new
