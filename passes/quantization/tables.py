"""The quantize pass on embedding tables (``include_embedding``): per-row symmetric int8.

``embedding(W, ids)`` -> ``embedding(Q, ids) * embedding(s, ids)``. A table tied to an lm_head the
pass quantized to int8 (its rows are the lm_head's output channels: the same per-row scales)
shares that lm_head's int8 codes instead of a copy.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.provenance import derived_from
from lqc.runtime.quantization.formats import QuantizedWeight, quantize_int8

from lqc.passes.quantization.report import LayerRow


def quantize_tables(graph: Graph, ctx, selects, quantized_linears: list[fx.Node]) -> list[LayerRow]:
    """Rewrite every selected embedding of a constant table; one report row per table."""
    rows = []
    for node in list(graph.nodes):
        if op_name(node) != "embedding":
            continue
        # F.embedding(ids, table, padding_idx, max_norm, ...) or aten.embedding(table, ids, ...)
        table_at = 0 if node.target is torch.ops.aten.embedding.default else 1
        table, ids = node.args[table_at], node.args[1 - table_at]
        max_norm = node.args[3] if table_at == 1 and len(node.args) > 3 else node.kwargs.get("max_norm")
        if not graph.is_constant(table) or not selects(node):
            continue
        if max_norm is not None:
            warnings.warn(f"lqc quantize: {graph.module_path(node)} renormalizes its rows (max_norm); left in float", stacklevel=3)
            continue
        name = (graph.fqns(table) or (table.name,))[0].removesuffix(".weight")
        weight = graph.constant(table)
        if not torch.isfinite(weight).all():
            raise LqcConfigError(f"the table of {name} contains NaN or inf; fix the model before quantizing it")
        canonical = _int8_table(graph, ctx, node, table, name, quantized_linears)
        rows.append(LayerRow(name, list(weight.shape), weight.nbytes, _added_bytes(graph, canonical), kind="embedding"))
        _rewrite(graph, node, table, ids, canonical, name, weight.dtype)
    return rows


def _int8_table(graph: Graph, ctx, node: fx.Node, table: fx.Node, name: str, quantized_linears: list[fx.Node]) -> QuantizedWeight:
    """The int8 lm_head tied to ``table``, else a new int8 copy of it (warned when the float
    table stays in use elsewhere)."""
    weight = graph.constant(table)
    shared = next((q for q in quantized_linears
                   if q.args[1] is not None and set(graph.fqns(table)) & set(graph.fqns(q.args[1]))), None)
    canonical = shared.meta["lqc_quantized"]["canonical"] if shared is not None else None
    if canonical is not None and canonical.format in ("int8", "w8a8") and canonical.padded_in_features == weight.shape[1]:
        return canonical
    canonical = ctx.transform(graph, ("embedding", name), [table], lambda: quantize_int8(weight))
    others = [u for g_node in graph.gm.graph.find_nodes(op="get_attr", target=table.target) for u in g_node.users if u is not node]
    if others:
        users = sorted({graph.module_path(u) or u.name for u in others})
        warnings.warn(
            f"quantize: {name}'s table is shared with a layer that stays in float ({', '.join(users)}); "
            f"the int8 copy adds {canonical.nbytes():,} bytes. With include_lm_head and format int8 they share it.",
            stacklevel=4,
        )
    return canonical


def _table_scales(canonical: QuantizedWeight) -> torch.Tensor:
    return canonical.scales.to(torch.float32)[:, None]


def _added_bytes(graph: Graph, canonical: QuantizedWeight) -> int:
    """Bytes the table adds: none for codes (and scales) a tied int8 lm_head already holds."""
    stored = {t.untyped_storage().data_ptr() for _, t in graph.constants()}
    return sum(t.untyped_storage().nbytes() for t in (canonical.qweight, _table_scales(canonical))
               if t.untyped_storage().data_ptr() not in stored)


def _rewrite(graph: Graph, node: fx.Node, table: fx.Node, ids, canonical: QuantizedWeight, name: str, dtype) -> None:
    fqns = graph.fqns(table)
    g = graph.gm.graph
    with derived_from(graph, [node, table]):
        codes = graph.add_constant(canonical.qweight, f"{name}.qweight", fqns, before=node)
        scales = graph.add_constant(_table_scales(canonical), f"{name}.scales", fqns, before=node)
        with g.inserting_before(node):
            gathered = g.call_method("to", (g.call_function(F.embedding, (ids, codes)), torch.float32))
            row_scales = g.call_function(F.embedding, (ids, scales))
            value = g.call_method("to", (g.call_function(torch.mul, (gathered, row_scales)), dtype))
    node.replace_all_uses_with(value)
    g.erase_node(node)
