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

With ``kernels: true`` (the default) weights on the CPU are laid out for torch's packed CPU
matmuls, which compute in bfloat16: fast, and as accurate as a bfloat16 model. ``kernels: false``
keeps the reference layout: exact dequantize-then-matmul in the activations' dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.lqc_ops import MOE_FFN_ARGS, MOE_FFN_SCALES, moe_ffn_args
from lqc.ir.linear import LinearSite, feeds_attention_scores, linear_sites
from lqc.ir.provenance import derived_from
from lqc.runtime.quantization.qlinear import kernel_layout
from lqc.runtime.quantization.formats import (
    QuantizedWeight, int4_minmax_params, pad_columns, quantize_fp8, quantize_int4, quantize_int8,
)

from lqc.passes.quantization.activation_stats import collect_input_stats
from lqc.passes.quantization.awq import search_clipping, search_clipping_hessian, search_scales
from lqc.passes.base import Pass, PassResult
from lqc.passes.quantization.gptq import gptq
from lqc.passes.quantization.hqq import hqq_int4_params
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass
from lqc.passes.reparam.scale_migration import find_producer, scale_producer
from lqc.passes.quantization.sensitivity import layer_sensitivity
from lqc.passes.quantization.smoothquant import search_smoothing

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
    kernels: bool = field(default=True, metadata={"help": "use torch's packed CPU kernels (bfloat16 compute) where shapes allow"})
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
        if self.method == "gptq" and self.format not in ("int4", "int8"):
            raise LqcConfigError(f"method 'gptq' quantizes int4 or int8 weights; got format {self.format!r}")
        if self.method == "awq" and self.format != "int4":
            raise LqcConfigError(f"method 'awq' quantizes int4 weights; got format {self.format!r}")
        if self.smoothquant and (self.format != "w8a8" or self.method != "rtn"):
            raise LqcConfigError(
                f"smoothquant smooths int8 activations: use format 'w8a8' with method 'rtn' (got {self.format!r}, {self.method!r})"
            )
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise LqcConfigError(f"quantize.smooth_alpha must lie in (0, 1), or be null to search; got {self.smooth_alpha}")


def int8_expert_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, scales [E, rows]) of a stacked expert weight [E, rows, cols]: each row
    quantized on its own, as a linear's output channel is."""
    experts, rows, cols = weight.shape
    q = quantize_int8(weight.reshape(experts * rows, cols))
    return q.qweight.reshape(experts, rows, cols), q.scales.reshape(experts, rows)


@register_pass
class Quantize(Pass):
    name = "quantize"
    description = "linear layers -> lqc::qlinear with int8 / int4 / w8a8 / fp8 (/ fp8_dyn) packed weights (rtn, hqq, gptq, awq)"
    Options = QuantizeOptions

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        if self.options.method in CALIBRATED_METHODS or self.options.smoothquant or self.options.keep_sensitive:
            self.requires = frozenset({"calibration"})

    def run(self, graph: Graph, ctx) -> PassResult:
        opts = self.options
        lm_head_nodes = {name for r in graph.regions_of_kind("lm_head") for name in r.nodes}
        sites = [
            site for site in linear_sites(graph)
            if self.selects(site.node) and (site.node.name not in lm_head_nodes or opts.include_lm_head)
        ]
        stats: dict = {}

        def input_stats(site: LinearSite):
            # Collected on the first weight the transform cache does not already hold, for all sites at once.
            if not stats:
                stats.update(
                    collect_input_stats(
                        graph, ctx.calibration_inputs(graph, tokens=opts.calibration_tokens), [s.x for s in sites],
                        max_samples=opts.awq_samples if (opts.method == "awq" or opts.gptq_params == "clip" or opts.smoothquant) else 0,
                        want_hessian=opts.method == "gptq" or opts.awq_gptq, progress=ctx.progress,
                    )
                )
            return stats[site.x.name]

        skipped = []
        for site in list(sites):
            name = site.name(graph)
            weight = site.weight_tensor(graph)
            if not torch.isfinite(weight).all():
                raise LqcConfigError(f"the weight of {name} contains NaN or inf; fix the model before quantizing it")
            if opts.format == "int4" and weight.shape[1] % opts.group_size and not opts.pad:
                sites.remove(site)
                skipped.append(name)
                warnings.warn(
                    f"quantize: {name} has {weight.shape[1]} inputs, not a multiple of group_size {opts.group_size}; "
                    f"left unquantized (pad: true would pad it)",
                    stacklevel=2,
                )

        kept = self._keep_sensitive(graph, ctx, sites) if opts.keep_sensitive else {}
        sites = [site for site in sites if site.name(graph) not in kept]
        migrates = opts.method == "awq" or opts.smoothquant
        migrated_weights, migration_groups = self._migrate(graph, ctx, sites, input_stats) if migrates else ({}, [])
        layers = []
        for site in sites:
            name = site.name(graph)
            weight = site.weight_tensor(graph)
            qweight = migrated_weights.get(name) or ctx.transform(
                graph, ("weight", name), [site.weight],
                lambda site=site, weight=weight: self.quantize_weight(weight, lambda: input_stats(site)),
            )
            bytes_before = graph.constant(site.weight).nbytes
            self._rewrite(graph, site, qweight, name)
            layers.append({"layer": name, "shape": list(weight.shape), "bytes_before": bytes_before, "bytes_after": qweight["nbytes"]})
        for name, (site, keep) in kept.items():
            shape, bytes_before = list(site.weight_tensor(graph).shape), graph.constant(site.weight).nbytes
            if keep is not None:  # int8 under int4: rewritten like any layer, in its own format
                self._rewrite(graph, site, keep, name)
            layers.append({"layer": name, "shape": shape, "bytes_before": bytes_before,
                           "bytes_after": keep["nbytes"] if keep else bytes_before, "kept": self._kept_format()})
        layers += self._quantize_experts(graph, ctx)
        if opts.include_embedding:
            layers += self._quantize_embeddings(graph, ctx, quantized_linears={
                n.meta["lqc_quantized"]["layer"]: n for n in graph.nodes if op_name(n) == "lqc::qlinear"
            })
        details = {"format": opts.format, "method": opts.method, "group_size": opts.group_size, "layers": layers, "skipped": skipped}
        if kept:
            details["sensitivity"] = self._ranking
        if migration_groups:
            details["awq" if opts.method == "awq" else "smoothquant"] = migration_groups
        return PassResult(matches=sum(layer.get("kept") != "float" for layer in layers), details=details)

    # -- experts: lqc::moe_ffn's weights as int8 codes, one scale per expert row --------------------
    def _quantize_experts(self, graph: Graph, ctx) -> list[dict]:
        """The expert weights of every selected ``lqc::moe_ffn`` (from ffn_to_moe) -> symmetric int8
        per output channel of each expert (round to nearest, whatever the method: the calibrated
        methods are written for linears). With ``kernels`` the scales are stored in bfloat16, which
        runs the experts on torch's int8 CPU kernel, in bfloat16 like the int8_cpu linears. Other
        formats leave the experts float, with a warning."""
        nodes = [n for n in graph.nodes if op_name(n) == "lqc::moe_ffn" and self.selects(n)]
        if not nodes:
            return []
        if self.options.format != "int8":
            warnings.warn(
                f"quantize: the experts of {len(nodes)} lqc::moe_ffn nodes stay float: expert weights are quantized "
                f"with format 'int8' only (got {self.options.format!r}); add a quantize step with format 'int8' "
                f"and targets matching the FFNs for them",
                stacklevel=3,
            )
            return []
        layers = []
        for node in nodes:
            args = moe_ffn_args(node)
            path = Graph.module_path(node)
            for weight_name, scale_name in MOE_FFN_SCALES.items():
                constant = args[weight_name]
                if constant is None or args[scale_name] is not None:  # no such weight, or already int8
                    continue
                weight = graph.constant(constant)
                name = f"{path}.experts.{weight_name}"
                codes, scales = ctx.transform(graph, ("experts", name), [constant], lambda weight=weight: int8_expert_weight(weight))
                if self.options.kernels and weight.device.type == "cpu":
                    scales = scales.to(torch.bfloat16)  # lqc::moe_ffn then runs torch's int8 CPU kernel
                with derived_from(graph, [node, constant]):
                    args[weight_name] = graph.add_constant(codes, name, graph.fqns(constant), before=node)
                    args[scale_name] = graph.add_constant(scales, f"{name}_scale", graph.fqns(constant), before=node)
                layers.append({"layer": name, "shape": list(weight.shape), "bytes_before": weight.nbytes,
                               "bytes_after": codes.nbytes + scales.nbytes, "experts": True, "method": "rtn"})
            node.args, node.kwargs = tuple(args[k] for k in MOE_FFN_ARGS), {}
        graph.prune_constants()
        return layers

    # -- embeddings: int8 rows, gathered, then scaled ----------------------------------------------
    def _quantize_embeddings(self, graph: Graph, ctx, quantized_linears: dict[str, fx.Node]) -> list[dict]:
        """``embedding(W, ids)`` -> ``embedding(Q, ids) * embedding(s, ids)``: per-row symmetric int8.

        A table tied to an lm_head this pass quantized to int8 (its rows are the lm_head's output
        channels: the same per-row scales) shares that lm_head's int8 codes instead of a copy."""
        rows = []
        for node in list(graph.nodes):
            if op_name(node) != "embedding":
                continue
            # F.embedding(ids, table, padding_idx, max_norm, ...) or aten.embedding(table, ids, ...)
            table_at = 0 if node.target is torch.ops.aten.embedding.default else 1
            table, ids = node.args[table_at], node.args[1 - table_at]
            max_norm = node.args[3] if table_at == 1 and len(node.args) > 3 else node.kwargs.get("max_norm")
            if not graph.is_constant(table) or not self.selects(node):
                continue
            if max_norm is not None:
                warnings.warn(f"quantize: {graph.module_path(node)} renormalizes its rows (max_norm); left in float", stacklevel=3)
                continue
            name = (graph.fqns(table) or (table.name,))[0].removesuffix(".weight")
            weight = graph.constant(table)
            if not torch.isfinite(weight).all():
                raise LqcConfigError(f"the table of {name} contains NaN or inf; fix the model before quantizing it")
            shared = next((q for q in quantized_linears.values() if q.args[1] is not None and set(graph.fqns(table)) & set(graph.fqns(q.args[1]))), None)
            canonical = shared.meta["lqc_quantized"]["canonical"] if shared is not None else None
            if canonical is None or canonical.format not in ("int8", "w8a8") or canonical.padded_in_features != weight.shape[1]:
                canonical = ctx.transform(graph, ("embedding", name), [table], lambda weight=weight: quantize_int8(weight))
                others = [u for g_node in graph.gm.graph.find_nodes(op="get_attr", target=table.target)
                          for u in g_node.users if u is not node]
                if others:
                    users = sorted({graph.module_path(u) or u.name for u in others})
                    warnings.warn(
                        f"quantize: {name}'s table is shared with a layer that stays in float ({', '.join(users)}); "
                        f"the int8 copy adds {canonical.nbytes():,} bytes. With include_lm_head and format int8 they share it.",
                        stacklevel=3,
                    )
            stored = {t.untyped_storage().data_ptr() for _, t in graph.constants()}
            table_scales = canonical.scales.to(torch.float32)[:, None]
            # bytes this table adds: none for codes (and scales) a tied int8 lm_head already holds
            bytes_after = sum(t.untyped_storage().nbytes() for t in (canonical.qweight, table_scales)
                              if t.untyped_storage().data_ptr() not in stored)
            fqns = graph.fqns(table)
            g = graph.gm.graph
            with derived_from(graph, [node, table]):
                codes = graph.add_constant(canonical.qweight, f"{name}.qweight", fqns, before=node)
                scales = graph.add_constant(table_scales, f"{name}.scales", fqns, before=node)
                with g.inserting_before(node):
                    gathered = g.call_method("to", (g.call_function(F.embedding, (ids, codes)), torch.float32))
                    row_scales = g.call_function(F.embedding, (ids, scales))
                    value = g.call_method("to", (g.call_function(torch.mul, (gathered, row_scales)), weight.dtype))
            node.replace_all_uses_with(value)
            g.erase_node(node)
            rows.append({"layer": name, "shape": list(weight.shape), "bytes_before": weight.nbytes, "bytes_after": bytes_after, "embedding": True})
        return rows

    # -- sensitivity: the k layers quantization hurts most stay in higher precision ------------------
    def _kept_format(self) -> str:
        opts = self.options
        return opts.keep_format if opts.keep_format != "auto" else ("int8" if opts.format == "int4" else "float")

    def _keep_sensitive(self, graph: Graph, ctx, sites: list[LinearSite]) -> dict[str, tuple[LinearSite, dict | None]]:
        """{layer: (site, its int8 weight, or None to stay float)} for the k most sensitive layers."""
        opts = self.options
        names = [site.name(graph) for site in sites]
        self._ranking = ctx.transform(
            graph, ("sensitivity", tuple(names)), [site.weight for site in sites],
            lambda: layer_sensitivity(graph, sites, ctx.calibration_inputs(graph, tokens=opts.sensitivity_tokens),
                                      self._fake_quantize, progress=ctx.progress),
        )
        by_name = dict(zip(names, sites))
        kept = {}
        for row in self._ranking[: opts.keep_sensitive]:
            site = by_name[row["layer"]]
            keep = None
            if self._kept_format() == "int8":
                weight = site.weight_tensor(graph)
                int8 = Quantize(format="int8", kernels=opts.kernels)
                keep = ctx.transform(graph, ("kept-int8", row["layer"]), [site.weight], lambda: int8.quantize_weight(weight))
            kept[row["layer"]] = (site, keep)
        return kept

    def _fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest in this pass's format, dequantized: the sensitivity proxy."""
        opts = self.options
        if opts.format == "int4":
            return quantize_int4(weight, opts.group_size).dequantize()
        if opts.format in ("fp8", "fp8_dyn"):
            return quantize_fp8(weight).dequantize()
        return quantize_int8(weight, fmt=opts.format).dequantize()

    # -- AWQ and SmoothQuant: scale migration per group of linears sharing an input ------------------
    def _migrate(self, graph: Graph, ctx, sites: list[LinearSite], input_stats) -> tuple[dict[str, dict], list[dict]]:
        """Scales for every group first (applied to float weights), then every weight quantized,
        as AWQ does: a row scaling of up_proj (for down_proj) must reach up_proj's own quantization."""
        by_input: dict[fx.Node, list[LinearSite]] = {}
        for site in sites:
            by_input.setdefault(site.x, []).append(site)
        groups = [(group, find_producer(graph, x, group)) for x, group in by_input.items()]
        names = {id(site): site.name(graph) for site in sites}
        sources = [site.weight for site in sites] + [c for _, p in groups if p for c in p.constants]
        result = ctx.transform(
            graph, ("migrate", tuple(names.values())), list(dict.fromkeys(sources)),
            lambda: self._migrate_compute(graph, groups, names, input_stats),
        )
        quantized_names = set(names.values())
        report = []
        for (group, producer), group_result in zip(groups, result["groups"]):
            # a producer that is itself quantized here already carries 1/s in its quantized rows
            if producer is not None and not (producer.site is not None and producer.site.name(graph) in quantized_names):
                scale_producer(graph, producer, group_result["scales"])
            report.append({
                "layers": [names[id(site)] for site in group], "alpha": group_result["alpha"],
                "scales_into": producer.describe(graph) if producer else None, "unclipped": group_result["unclipped"],
            })
        return result["weights"], report

    def _migrate_compute(self, graph: Graph, groups, names: dict, input_stats) -> dict:
        opts = self.options
        g = opts.group_size
        weights = {names[id(site)]: site.weight_tensor(graph).to(torch.float32) for group, _ in groups for site in group}
        group_results = []
        for group, producer in groups:
            stats = input_stats(group[0])
            group_names = [names[id(site)] for site in group]
            if producer is not None:
                group_weights = [weights[n] for n in group_names]
                if opts.smoothquant:
                    scales, alpha, _ = search_smoothing(stats.sample, stats.abs_max, group_weights, opts.smooth_alpha)
                else:
                    scales, alpha, _ = search_scales(stats.sample, stats.abs_mean, group_weights, g, grid=opts.awq_grid)
                for n in group_names:
                    weights[n] = weights[n] * scales[None, :]
                if producer.site is not None and producer.site.name(graph) in weights:
                    up = producer.site.name(graph)
                    weights[up] = weights[up] / scales[:, None]  # rows: the up projection's outputs
            else:
                scales, alpha = torch.ones(stats.width), None
            unclipped = [n for site, n in zip(group, group_names) if feeds_attention_scores(site.node)]
            group_results.append({"scales": scales, "alpha": alpha, "unclipped": unclipped, "x": stats.sample / scales, "stats": stats})
        quantized = {}
        for (group, _), info in zip(groups, group_results):
            for site in group:
                name = names[id(site)]
                if opts.smoothquant:
                    quantized[name] = self.quantize_weight(weights[name])
                    continue
                padded = pad_columns(weights[name], g)
                if opts.awq_gptq:
                    # the inputs are now x / s: their Hessian is diag(1/s) H diag(1/s)
                    inv = 1.0 / info["scales"].to(torch.float64)
                    canonical = self._gptq(weights[name], info["stats"], hessian=info["stats"].mean_hessian * inv[:, None] * inv[None, :],
                                           x=info["x"], clip=name not in info["unclipped"])
                    quantized[name] = {"canonical": canonical, "nbytes": canonical.nbytes(), **self._layout(canonical, weights[name].device)}
                    continue
                if name in info["unclipped"]:
                    group_scales, group_zeros = int4_minmax_params(padded, g)
                else:
                    group_scales, group_zeros = search_clipping(pad_columns(info["x"], g), padded, g)
                canonical = quantize_int4(weights[name], g, group_scales, group_zeros)
                quantized[name] = {"canonical": canonical, "nbytes": canonical.nbytes(), **self._layout(canonical, weights[name].device)}
        for info in group_results:
            del info["x"], info["stats"]
        return {"groups": group_results, "weights": quantized}

    # -- weights ---------------------------------------------------------------------------------
    def quantize_weight(self, weight: torch.Tensor, input_stats=None) -> dict:
        """The quantized weight: its canonical form (what lqc.save writes) and the constants the
        graph uses (the kernel layout where one applies). ``input_stats()`` gives the layer's
        calibration statistics (calibrated methods only)."""
        opts = self.options
        if opts.method == "gptq":
            canonical = self._gptq(weight, input_stats())
        elif opts.format == "int4":
            scales = zeros = None
            if opts.method == "hqq":
                padded = pad_columns(weight.to(torch.float32), opts.group_size)
                scales, zeros = hqq_int4_params(padded, opts.group_size, iters=opts.hqq_iters)
            canonical = quantize_int4(weight, opts.group_size, scales, zeros)
        elif opts.format in ("fp8", "fp8_dyn"):
            canonical = quantize_fp8(weight, fmt=opts.format)
        else:
            canonical = quantize_int8(weight, fmt=opts.format)
        return {"canonical": canonical, "nbytes": canonical.nbytes(), **self._layout(canonical, weight.device)}

    def _gptq(self, weight: torch.Tensor, stats, hessian: torch.Tensor | None = None,
              x: torch.Tensor | None = None, clip: bool = True) -> QuantizedWeight:
        opts = self.options
        k = weight.shape[1]
        group = opts.group_size if opts.format == "int4" else 0
        padded = pad_columns(weight.to(torch.float32), group) if group else weight.to(torch.float32)
        full = torch.zeros(padded.shape[1], padded.shape[1], dtype=torch.float64)
        full[:k, :k] = stats.mean_hessian if hessian is None else hessian  # padded inputs are always zero: dead columns
        group_params = None
        if group and opts.gptq_params == "clip":
            x = stats.sample if x is None else x
            group_params = search_clipping(pad_columns(x, group), padded, group) if clip else int4_minmax_params(padded, group)
        elif group and opts.gptq_params == "mse":
            group_params = search_clipping_hessian(full, padded, group, search=opts.mse_search) if clip else int4_minmax_params(padded, group)
        result = gptq(padded, full, fmt=opts.format, group_size=group, block_size=opts.block_size,
                      damp=opts.damp, act_order=opts.act_order, group_params=group_params)
        if opts.format == "int4":
            return quantize_int4(result.weight[:, :k], group, result.scales, result.zeros)
        return quantize_int8(result.weight, scales=result.scales)

    def _layout(self, q: QuantizedWeight, device: torch.device) -> dict:
        use_kernels = self.options.kernels and device.type == "cpu"
        kernel = q.format
        if use_kernels and q.format == "int8":
            kernel = "int8_cpu"
        elif use_kernels and q.format == "int4" and q.out_features % 16 == 0:
            kernel = "int4_cpu"
        qweight, scales, zeros = kernel_layout(q, kernel)
        return {"fmt": kernel, "qweight": qweight, "scales": scales, "zeros": zeros}

    # -- graph -----------------------------------------------------------------------------------
    def _rewrite(self, graph: Graph, site: LinearSite, q: dict, name: str) -> fx.Node:
        canonical: QuantizedWeight = q["canonical"]
        fqns = graph.fqns(site.weight)
        g = graph.gm.graph
        with derived_from(graph, [site.node, site.weight]):
            qweight = graph.add_constant(q["qweight"], f"{name}.qweight", fqns, before=site.node)
            scales = graph.add_constant(q["scales"], f"{name}.scales", fqns, before=site.node)
            zeros = graph.add_constant(q["zeros"], f"{name}.zeros", fqns, before=site.node) if q["zeros"] is not None else None
            with g.inserting_before(site.node):
                new = g.call_function(
                    torch.ops.lqc.qlinear.default,
                    (site.x, qweight, scales, zeros, site.bias, q["fmt"], canonical.group_size,
                     canonical.in_features, canonical.out_features),
                )
        new.meta["lqc_quantized"] = {"layer": name, "format": canonical.format, "canonical": canonical}
        site.node.replace_all_uses_with(new)
        g.erase_node(site.node)
        return new
