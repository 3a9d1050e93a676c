"""``target="triton"``: a graph's fusion groups run as Triton kernels.

``lower_to_triton(graph)`` (the lowering pass lower_triton, lqc.lowering) partitions the graph
(lqc.codegen.partition) and rewrites each group:

- ``lqc::qlinear`` with a dequant-GEMM format (int8 / int4 / fp8 / w8a8 / fp8_dyn, the canonical
  layouts the quantize pass emits): the RMSNorm
  prologue (lqc.codegen.prologue), the anchor and the epilogue nodes the kernel can compute
  become one ``lqc::fused_qlinear`` call naming the kernel generated for them
  (lqc.codegen.qlinear_kernels, cached by lqc.codegen.kernel_cache);
- ``lqc::moe_ffn`` and its residual add become ``lqc::moe_ffn_grouped``, the grouped-GEMM
  template over permuted tokens (lqc.codegen.moe_gemm);
- the KV attention ops keep their nodes and attend with the flash-decoding kernel over the
  compressed cache (lqc.codegen.kv_decode) when ``TritonProgram`` runs the graph.

``TritonProgram`` hands the lowered graph to Inductor: the nodes outside the groups become
Inductor's code, the kernels its extern calls. What is not lowered (layer-norm prologues, an epilogue step
no template computes) keeps its op, and one warning per graph lists it with the reason. On CPU the
kernels run under ``TRITON_INTERPRET=1`` (slow, exact: how CI checks codegen end to end);
without it, CPU tensors are an error that says so, never a crash in a kernel.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.lqc_ops import qlinear_args
from lqc.ir.printer import format_call

from . import kernel_cache
from .epilogue import epilogue_program
from .groups import GroupDescription, describe_groups
from .partition import partition
from .prologue import norm_prologue
from .qlinear_kernels import kernel_for, qlinear_source
from .templates import CPU_LAYOUT_BASE, DEQUANT_GEMM_FORMATS


@dataclass
class Lowering:
    """What ``lower_to_triton`` did to one graph."""

    kernels: dict[str, list[str]] = field(default_factory=dict)  # kernel key -> fused_qlinear nodes using it
    fused_nodes: dict[str, list[str]] = field(default_factory=dict)  # fused_qlinear node -> the nodes it replaced
    left: Counter = field(default_factory=Counter)  # why groups (or parts of them) were not lowered
    sources: dict[str, str] = field(default_factory=dict)  # kernel key -> its source, annotated for debug_dir
    kv_attention: list[str] = field(default_factory=list)  # KV attention nodes that attend with the flash-decoding kernel
    groups: GroupDescription = field(default_factory=GroupDescription)  # the partition, before the rewrite (lqc.viz)


def check_triton_runs_here(example_inputs) -> bool:
    """Triton needs a GPU, or CPU tensors with TRITON_INTERPRET=1 set before lqc's kernels were
    imported. Returns whether the inputs are on the CPU (the kernels interpreted)."""
    on_cpu = any(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in example_inputs)
    if not on_cpu:
        return False
    try:
        from .dequant_gemm import interpreted
    except ImportError as exc:
        raise LqcConfigError(f"target='triton' needs triton (pip install 'lqc[triton]'): {exc}") from exc
    if not interpreted():
        raise LqcConfigError(
            "target='triton' on CPU tensors runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing lqc (slow; for checking). For speed on CPU use target='auto'"
        )
    return True


def lower_to_triton(graph: Graph, debug_dir: str | Path | None = None, autotune: bool = False) -> Lowering:
    """Rewrite ``graph`` in place: qlinear groups -> ``lqc::fused_qlinear`` calls on generated kernels.
    ``autotune``: the calls pick their launch config with lqc.codegen.autotune (measured once per
    kernel and shape, then read from its cache)."""
    lowering = Lowering()
    groups = partition(graph)
    lowering.groups = describe_groups(groups)
    for group in groups:
        if group.kind == "moe_ffn":
            _lower_moe(graph, group, lowering)
        elif group.kind == "kv_attention":
            _lower_kv_attention(graph, group, lowering)
        elif group.kind == "qlinear":
            _lower_qlinear(graph, group, lowering, autotune)
        else:
            lowering.left[f"{group.kind}: no Triton template yet (runs its lqc op)"] += 1
    graph.prune_constants()
    graph.recompile()
    if lowering.left:
        warnings.warn(
            f"lqc: {graph.name} at target='triton': not everything became a generated kernel: "
            + "; ".join(f"{count}x {why}" for why, count in lowering.left.items()),
            stacklevel=2,
        )
    if debug_dir is not None:
        write_kernel_sources(lowering, Path(debug_dir))
    return lowering


def _lower_qlinear(graph: Graph, group, lowering: Lowering, autotune: bool) -> None:
    """A qlinear group -> one ``lqc::fused_qlinear`` call: its RMSNorm prologue, the anchor and the
    epilogue nodes the kernel computes."""
    args = qlinear_args(group.anchor)
    fmt = args["fmt"]
    if fmt in CPU_LAYOUT_BASE:
        # torch's packed CPU layouts (the eager/Inductor lowering pack_cpu_layouts) compute in
        # bfloat16; the kernels here read the canonical layout the quantize pass emits, and the
        # triton target does not run that lowering. Only a hand-made pipeline gets here.
        lowering.left[f"qlinear {fmt}: a packed CPU layout; target triton reads the canonical {CPU_LAYOUT_BASE[fmt]}"] += 1
        return
    if fmt not in DEQUANT_GEMM_FORMATS:
        lowering.left[f"qlinear {fmt}: no dequant-GEMM template (runs lqc::qlinear)"] += 1
        return
    if args["lowrank_a"] is not None:
        lowering.left["qlinear with low-rank factors: the dequant-GEMM templates have no low-rank epilogue (runs lqc::qlinear)"] += 1
        return
    x, norm_weight, norm_eps, prologue_nodes = args["x"], None, None, []
    if group.prologue:
        norm, why = norm_prologue(group.prologue, group.roles[group.prologue[0]], args["x"])
        if norm is None:
            lowering.left[why] += 1
        else:
            x, norm_weight, norm_eps, prologue_nodes = norm.x, norm.weight, norm.eps, list(group.prologue)
    program = epilogue_program(group.anchor, [n for n in group.epilogue if group.roles.get(n) != "unpack"])
    if program.stopped_at is not None:
        lowering.left[f"epilogue stops at {op_name(program.stopped_at)}: {program.stop_reason}"] += 1
    last = program.output or group.anchor
    key = kernel_for(program)
    replaced = [*prologue_nodes, group.anchor, *program.nodes]
    g = graph.gm.graph
    with g.inserting_before(last):
        fused = g.call_function(
            torch.ops.lqc.fused_qlinear.default,
            (x, args["qweight"], args["scales"], args["zeros"], args["bias"], norm_weight, norm_eps, list(program.inputs),
             key, fmt, args["group_size"], args["in_features"], args["out_features"], last.meta["val"].dtype, autotune),
        )
    fused.meta.update({k: v for k, v in last.meta.items() if k != "lqc_provenance"})
    fused.meta["lqc_kernel"] = key
    last.replace_all_uses_with(fused)
    for node in reversed(replaced):
        g.erase_node(node)
    lowering.kernels.setdefault(key, []).append(fused.name)
    lowering.fused_nodes[fused.name] = [n.name for n in replaced]
    lowering.sources[key] = lowering.sources.get(key, "") + "".join(
        f"# {fused.name}: {format_call(n)}  [{graph.module_path(n)}]\n" for n in replaced)


def _lower_moe(graph: Graph, group, lowering: Lowering) -> None:
    """``lqc::moe_ffn`` -> ``lqc::moe_ffn_grouped`` (lqc.codegen.moe_gemm: the grouped-GEMM template,
    same operands). An epilogue of one residual add becomes its ``residual`` operand: the sum of
    the experts' rows starts from it."""
    from .moe_gemm import moe_ffn_grouped  # noqa: F401  - registers the op

    anchor, g = group.anchor, graph.gm.graph
    kwargs = dict(anchor.kwargs)
    last, replaced = anchor, [anchor]
    if group.epilogue:
        (add, *rest) = group.epilogue
        residual = add.args[1] if add.args[0] is anchor else add.args[0]
        if not rest and group.roles.get(add) == "residual" and add.meta["val"].dtype == anchor.meta["val"].dtype:
            kwargs["residual"] = residual
            last, replaced = add, [anchor, add]
        else:
            lowering.left["moe_ffn epilogue other than one residual add: runs after the grouped GEMMs"] += 1
    with g.inserting_before(last):
        grouped = g.call_function(torch.ops.lqc.moe_ffn_grouped.default, anchor.args, kwargs)
    grouped.meta.update({k: v for k, v in last.meta.items() if k != "lqc_provenance"})
    last.replace_all_uses_with(grouped)
    for node in reversed(replaced):
        g.erase_node(node)
    lowering.fused_nodes[grouped.name] = [n.name for n in replaced]


def _lower_kv_attention(graph: Graph, group, lowering: Lowering) -> None:
    """A KV attention op keeps its node (its cache handling, and Inductor's extern call to it) and
    attends with the flash-decoding kernel: ``TritonProgram`` runs the graph inside
    ``runtime.kv.attention.attention_kernel(kv_decode.attend_triton)``."""
    from . import kv_decode  # noqa: F401  - imports triton now, with the kernels decorated as the others

    lowering.kv_attention.append(group.anchor.name)
    lowering.fused_nodes[group.anchor.name] = [group.anchor.name]


class TritonProgram:
    """What ``target="triton"`` runs for one graph: the lowered graph (``graph_module``: generated
    kernels as custom-op calls, the rest as it was) compiled by Inductor, which generates its own
    code for the nodes outside the groups and calls lqc's ops as externs. The KV attention ops, if
    any, attend with the flash-decoding kernel (a context around each call, see
    ``runtime.kv.attention.attention_kernel``). Where Inductor cannot compile the graph, it runs
    eagerly (warned)."""

    def __init__(self, graph_module: fx.GraphModule, lowering: Lowering, example_inputs, inductor: bool = True):
        self.graph_module = graph_module
        self.lowering = lowering
        self.rest = "inductor" if inductor else "eager"
        self._run = graph_module.forward
        if not inductor:
            return
        try:
            from torch._inductor.compile_fx import compile_fx

            self._run = compile_fx(graph_module, list(example_inputs))
        except Exception as exc:  # noqa: BLE001 - any failure: the graph still runs, eagerly
            warnings.warn(f"lqc: Inductor could not compile the rest of the graph at target='triton' "
                          f"({type(exc).__name__}: {exc}); it runs eagerly around the kernels", stacklevel=3)
            self._run, self.rest = graph_module.forward, "eager"

    def __call__(self, *args):
        if not self.lowering.kv_attention:
            return self._run(*args)
        from lqc.runtime.kv.attention import attention_kernel

        from .kv_decode import attend_triton

        with attention_kernel(attend_triton):
            return self._run(*args)


def write_kernel_sources(lowering: Lowering, debug_dir: Path) -> None:
    """``kernels/<key>.py`` per kernel: the FX nodes it computes in this graph, then its source."""
    folder = debug_dir / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    for key, annotation in lowering.sources.items():
        module = kernel_cache.loaded(key)
        source = Path(module.__file__).read_text() if module is not None else ""
        (folder / f"{key}.py").write_text(
            f"# lqc kernel {key}: computes these FX nodes of this graph\n{annotation}\n{source}"
        )


__all__ = ["Lowering", "TritonProgram", "check_triton_runs_here", "lower_to_triton", "qlinear_source",
           "write_kernel_sources"]
