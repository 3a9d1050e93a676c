"""``pack_cpu_layouts``: quantized weights on the CPU -> the layouts of torch's packed CPU matmuls.

The quantize pass emits canonical ``lqc::qlinear`` nodes (lqc.runtime.quantization.formats) and
records ``kernels`` in ``meta["lqc_quantized"]``. Where it was on (the default) and the weight
lives on the CPU, this lowering, run for the eager and Inductor targets, rewrites

- an ``int4`` qlinear quantized with ``activations: int8`` to ``int4_vnni`` (lqc's AVX-512 VNNI
  kernel: activations to int8 per token, runtime/quantization/int4_int8_cpu.py);
- a ``w8a8`` qlinear to ``w8a8_vnni`` where that kernel is available (same math: int8 codes times
  per-token int8 activations, lqc's AVX-512 VNNI kernel);
- an ``int8`` qlinear to ``int8_cpu`` (codes padded to K % 32 == 0, bfloat16 scales:
  ``torch._weight_int8pack_mm``), and an ``int4`` one whose N is a multiple of 16 to ``int4_cpu``
  (torch's packed int4 tiles, bfloat16 scales and zeros: ``_weight_int4pack_mm_for_cpu``);
- the float32 expert scales of an int8 ``lqc::moe_ffn`` to bfloat16, which runs its experts on
  torch's int8 CPU kernel (lqc.runtime.structural.moe).

These kernels compute in bfloat16: fast, and as accurate as a bfloat16 model. Other formats,
other devices and ``kernels: false`` keep the canonical layout. The Triton target reads the
canonical layout directly, so it does not run this pass. The packed tensors are built once per
model (the transform cache) from the canonical ones, deterministically: lqc.load's ``QLinear``
builds the same ones from a saved model.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.lqc_ops import MOE_FFN_ARGS, MOE_FFN_SCALES, moe_ffn_args, qlinear_args
from lqc.ir.provenance import derived_from
from lqc.runtime.quantization.formats import QuantizedWeight
from lqc.runtime.quantization.int4_int8_cpu import load_kernel
from lqc.runtime.quantization.qlinear import kernel_layout

from lqc.passes.base import Pass, PassResult

# torch's int4 CPU kernel packs output channels in tiles of 16
INT4_CPU_N_MULTIPLE = 16


def cpu_layout(q: QuantizedWeight, activations: str = "bf16") -> str | None:
    """The packed CPU qlinear format for a canonical weight, or None where there is none. int4 with
    ``activations="int8"`` takes lqc's VNNI kernel where this CPU and compiler have it (else torch's
    int4 kernel, warned once)."""
    if q.format == "int8":
        return "int8_cpu"
    if q.format == "w8a8":  # the same math as the reference, on VNNI where this CPU has it
        return "w8a8_vnni" if load_kernel() is None else None
    if q.format == "int4" and activations == "int8":
        if (why := load_kernel()) is None and q.group_size % 8 == 0:
            return "int4_vnni"
        _warn_no_vnni(why or f"group size {q.group_size} is not a multiple of 8")
    if q.format == "int4" and q.out_features % INT4_CPU_N_MULTIPLE == 0:
        return "int4_cpu"
    return None


@functools.cache
def _warn_no_vnni(why: str) -> None:
    warnings.warn(f"quantize activations=int8: lqc's int4 x int8 kernel is unavailable ({why}); "
                  "int4 layers run torch's int4 kernel with bf16 activations instead", stacklevel=4)


def packed_layout(graph: Graph, node: fx.Node) -> str | None:
    """The packed CPU format pack_cpu_layouts gives an ``lqc::qlinear`` node, or None where it
    keeps its layout (``kernels: false``, not a weight quantize made, not on the CPU, no such layout)."""
    info = node.meta.get("lqc_quantized")
    if info is None or not info.get("kernels") or info.get("canonical") is None:
        return None
    args = qlinear_args(node)
    if args["fmt"] != info["canonical"].format or graph.constant(args["qweight"]).device.type != "cpu":
        return None
    return cpu_layout(info["canonical"], info.get("activations", "bf16"))


@dataclass
class PackReport:
    layers: list[str] = field(default_factory=list)  # qlinears now in int8_cpu / int4_cpu
    experts: list[str] = field(default_factory=list)  # lqc::moe_ffn nodes with bfloat16 expert scales


class PackCpuLayouts(Pass):
    name = "pack_cpu_layouts"
    stage = "lowering"
    description = "quantized weights on the CPU -> torch's packed CPU layouts (int8_cpu, int4_cpu, bf16 expert scales)"

    def run(self, graph: Graph, ctx) -> PassResult:
        report = PackReport()
        for node in list(graph.nodes):
            info = node.meta.get("lqc_quantized")
            if info is None or not info.get("kernels"):
                continue
            if op_name(node) == "lqc::qlinear" and self._pack_qlinear(graph, ctx, node, info):
                report.layers.append(info["layer"])
            elif op_name(node) == "lqc::moe_ffn" and self._pack_experts(graph, ctx, node, info):
                report.experts.append(info["layer"])
        return PassResult(matches=len(report.layers) + len(report.experts), details=report)

    def _pack_qlinear(self, graph: Graph, ctx, node: fx.Node, info: dict) -> bool:
        layout = packed_layout(graph, node)
        if layout is None:
            return False
        args, canonical = qlinear_args(node), info["canonical"]
        sources = [args["qweight"], args["scales"]] + ([args["zeros"]] if args["zeros"] is not None else [])
        qweight, scales, zeros = ctx.transform(graph, ("cpu_layout", info["layer"], layout), sources,
                                               lambda: kernel_layout(canonical, layout))
        fqns, name, g = graph.fqns(args["qweight"]), info["layer"], graph.gm.graph
        with derived_from(graph, [node, *sources]):
            qweight = graph.add_constant(qweight, f"{name}.qweight", fqns, before=node)
            scales = graph.add_constant(scales, f"{name}.scales", fqns, before=node)
            zeros = graph.add_constant(zeros, f"{name}.zeros", fqns, before=node) if zeros is not None else None
            lowrank = self._float_factors(graph, ctx, node, args, name)
            with g.inserting_before(node):
                new = g.call_function(node.target, (args["x"], qweight, scales, zeros, *node.args[4:5], layout, *node.args[6:9], *lowrank))
        new.meta["lqc_quantized"] = info
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return True

    @staticmethod
    def _float_factors(graph: Graph, ctx, node: fx.Node, args: dict, name: str) -> tuple:
        """int8 low-rank factors as float32 ``a`` and ``b * scale`` (no scale): a decode step then
        multiplies them as they are instead of converting ~r (N + K) codes per call. The stored
        (and counted) form stays int8 in the canonical graph."""
        if args["lowrank_a"] is None:
            return ()
        if graph.constant(args["lowrank_a"]).dtype != torch.int8:
            return tuple(node.args[9:12])
        sources = [args["lowrank_a"], args["lowrank_b"], args["lowrank_scale"]]
        a, b = ctx.transform(graph, ("cpu_layout", name, "lowrank"), sources, lambda: (
            graph.constant(sources[0]).to(torch.float32),
            graph.constant(sources[1]).to(torch.float32) * graph.constant(sources[2])[:, None]))
        fqns = graph.fqns(args["qweight"])
        return (graph.add_constant(a, f"{name}.lowrank_a", fqns, before=node),
                graph.add_constant(b, f"{name}.lowrank_b", fqns, before=node), None)

    def _pack_experts(self, graph: Graph, ctx, node: fx.Node, info: dict) -> bool:
        args = moe_ffn_args(node)
        scale_nodes = [args[s] for s in MOE_FFN_SCALES.values() if args[s] is not None]
        if not scale_nodes or any(graph.constant(s).dtype != torch.float32 or graph.constant(s).device.type != "cpu"
                                  for s in scale_nodes):
            return False
        g = graph.gm.graph
        with derived_from(graph, [node, *scale_nodes]):
            for scale_name in MOE_FFN_SCALES.values():
                old = args[scale_name]
                if old is None:
                    continue
                bf16 = ctx.transform(graph, ("cpu_layout", f"{info['layer']}.{scale_name}"), [old],
                                     lambda old=old: graph.constant(old).to(torch.bfloat16))
                args[scale_name] = graph.add_constant(bf16, old.target, graph.fqns(old), before=node)
            with g.inserting_before(node):
                new = g.call_function(node.target, tuple(args[k] for k in MOE_FFN_ARGS))
        new.meta["lqc_quantized"] = info
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return True
