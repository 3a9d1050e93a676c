"""The quantize pass on ``lqc::moe_ffn`` (from ffn_to_moe): expert weights as int8 codes, one
symmetric scale per output channel of each expert, round to nearest whatever the method (the
calibrated methods are written for linears). Other formats leave the experts float, warned.

The scales are float32 here; ``kernels`` is recorded in the node's ``meta["lqc_quantized"]`` for
the pack_cpu_layouts lowering, which stores them in bfloat16 on the CPU (torch's int8 kernel).
"""

from __future__ import annotations

import warnings

import torch

from lqc.ir import Graph, op_name
from lqc.ir.lqc_ops import MOE_FFN_ARGS, MOE_FFN_SCALES, moe_ffn_args
from lqc.ir.provenance import derived_from
from lqc.runtime.quantization.formats import quantize_int8

from lqc.passes.quantization.report import LayerRow


def int8_expert_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, scales [E, rows]) of a stacked expert weight [E, rows, cols]: each row
    quantized on its own, as a linear's output channel is."""
    experts, rows, cols = weight.shape
    q = quantize_int8(weight.reshape(experts * rows, cols))
    return q.qweight.reshape(experts, rows, cols), q.scales.reshape(experts, rows)


def quantize_experts(opts, graph: Graph, ctx, selects) -> list[LayerRow]:
    """Quantize the experts of every selected ``lqc::moe_ffn``; one report row per weight."""
    nodes = [n for n in graph.nodes if op_name(n) == "lqc::moe_ffn" and selects(n)]
    if not nodes:
        return []
    if opts.format != "int8":
        warnings.warn(
            f"quantize: the experts of {len(nodes)} lqc::moe_ffn nodes stay float: expert weights are quantized "
            f"with format 'int8' only (got {opts.format!r}); add a quantize step with format 'int8' "
            f"and targets matching the FFNs for them",
            stacklevel=3,
        )
        return []
    rows = []
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
            with derived_from(graph, [node, constant]):
                args[weight_name] = graph.add_constant(codes, name, graph.fqns(constant), before=node)
                args[scale_name] = graph.add_constant(scales, f"{name}_scale", graph.fqns(constant), before=node)
            rows.append(LayerRow(name, list(weight.shape), weight.nbytes, codes.nbytes + scales.nbytes, kind="experts"))
        node.args, node.kwargs = tuple(args[k] for k in MOE_FFN_ARGS), {}
        node.meta["lqc_quantized"] = {"layer": f"{path}.experts", "format": "int8", "kernels": opts.kernels}
    graph.prune_constants()
    return rows
