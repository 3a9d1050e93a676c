"""Inductor one decoder block at a time: each distinct block compiled once, run for every block like it.

A 30-layer model is 30 copies of one block with different weights. Handed the whole graph,
Inductor lowers, schedules and generates code for every copy (g++ then sees the identical kernels
only once, but the Python work before it grows with the depth). Here the graph is cut where one
block ends and the next begins (``ir.regions``' blocks). Each piece becomes a GraphModule whose
weights are inputs, and pieces with the same code and the same input shapes share one compiled
function. On SmolLM2-135M with ``default`` this takes the prefill graph's cold compile (dynamo's
trace included) from 39 s to 21.5 s and the decode graph's from 31 s to 11.3 s
(benchmarks/results/shared-blocks-smollm2.md); logits stay as close to eager as the whole
graph's, and decode speed is within this machine's noise or a few percent below (0.95x-1.03x):
~30 more calls a step, and the residual add that ends a block no longer fuses with the norm
that starts the next.

It applies to graphs with static shapes whose values crossing a cut are tensors and that mutate
only their own inputs (a KV cache) or constants; ``compile_shared_blocks`` returns None for
anything else, and the caller compiles the graph whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from lqc.ir import Graph

log = logging.getLogger(__name__)

# Fewer blocks than this: the per-piece overhead of compiling (an AOTAutograd trace and a module
# for each distinct piece) outweighs what sharing saves, so the graph compiles whole.
MIN_BLOCKS = 4


@dataclass
class Piece:
    """Consecutive nodes of the graph: everything before the first block ("pre"), one block, or
    everything after the last ("post"). Nodes outside any block between two blocks join the piece
    before them."""

    key: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # values it reads from outside: placeholders, constants, earlier pieces' nodes
    outputs: list[fx.Node]  # its values read after it (by later pieces or the graph's output)


def split_at_blocks(graph: Graph) -> list[Piece]:
    """The graph's nodes cut into pieces at block boundaries, in graph order."""
    block_paths = {r.path: r.block for r in graph.regions if r.kind == "block"}
    work = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    blocks = [_block_of(n, block_paths) for n in work]
    in_blocks = [i for i, b in enumerate(blocks) if b is not None]
    pieces: list[Piece] = []
    key = "pre"
    for i, (node, block) in enumerate(zip(work, blocks)):
        if in_blocks and i > in_blocks[-1]:
            block_key = "post"
        else:
            block_key = f"block {block}" if block is not None else key
        if not pieces or block_key != key:
            pieces.append(Piece(block_key, [], [], []))
            key = block_key
        pieces[-1].nodes.append(node)
    for piece in pieces:
        inside = set(piece.nodes)
        piece.inputs = list(dict.fromkeys(a for n in piece.nodes for a in n.all_input_nodes if a not in inside))
        piece.outputs = [n for n in piece.nodes if any(u not in inside for u in n.users)]
    return pieces


def _block_of(node: fx.Node, block_paths: dict[str, int]) -> int | None:
    for path, _cls in Graph.module_stack(node):
        if path in block_paths:
            return block_paths[path]
    return None


def piece_module(piece: Piece) -> fx.GraphModule:
    """The piece as a GraphModule of its inputs (weights included) returning its outputs."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, value in enumerate(piece.inputs):
        env[value] = g.placeholder(f"input_{i}")
    for node in piece.nodes:
        env[node] = g.node_copy(node, lambda a: env[a])
        if "val" in node.meta:  # AOTAutograd's cache needs dynamo's field on method calls (codegen.targets)
            env[node].meta.setdefault("example_value", node.meta["val"])
    g.output(tuple(env[n] for n in piece.outputs))
    return fx.GraphModule(torch.nn.Module(), g)


def signature(module: fx.GraphModule, args: Sequence[torch.Tensor]) -> str | None:
    """What Inductor's output depends on: each node's op, target and arguments (nodes by position)
    and each input's shape, stride, dtype, device and which earlier input shares its storage.
    None when an argument holds a tensor constant (its value is not in the text)."""
    position: dict[fx.Node, int] = {}
    parts: list[Any] = []
    for i, node in enumerate(module.graph.nodes):
        position[node] = i
        if node.op == "placeholder":
            continue
        tensors: list[torch.Tensor] = []
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: tensors.append(a) if isinstance(a, torch.Tensor) else a)
        if tensors:
            return None
        arguments = fx.node.map_arg((node.args, node.kwargs), lambda a: f"%{position[a]}")
        parts.append((node.op, str(node.target), repr(arguments)))
    storages: dict[int, int] = {}
    for i, arg in enumerate(args):
        shared = storages.setdefault(arg.untyped_storage().data_ptr(), i)
        parts.append((tuple(arg.shape), arg.stride(), arg.storage_offset(), str(arg.dtype), str(arg.device), shared))
    return repr(parts)


class SharedBlockProgram:
    """Runs the pieces in order; each piece's values live until the last piece that reads them."""

    def __init__(self, graph: Graph, steps: list[tuple[str, Callable, list[int], list[int], list[int]]],
                 slots: int, user_slots: list[int], constants: dict[int, torch.Tensor], result: Any,
                 compiled: int):
        self.steps = steps  # (piece key, compiled piece, input slots, output slots, slots free after it)
        self.slots = slots
        self.user_slots = user_slots
        self.constants = constants
        self.template: list[Any] = [None] * slots  # the constants in their slots, copied per call
        for slot, tensor in constants.items():
            self.template[slot] = tensor
        self.result = result  # the graph's output structure, slots in place of nodes
        self.pieces = len(steps)
        self.compiled = compiled  # distinct pieces compiled
        self.name = graph.name

    def __call__(self, *user_inputs: Any) -> Any:
        values = self.template.copy()
        for slot, value in zip(self.user_slots, user_inputs):
            values[slot] = value
        profiling = torch.autograd.profiler._is_profiler_enabled  # lqc.decode_profile names the pieces
        for key, fn, inputs, outputs, free in self.steps:
            if profiling:
                with torch.profiler.record_function(f"lqc piece {key}"):
                    results = fn(*[values[s] for s in inputs])
            else:
                results = fn(*[values[s] for s in inputs])
            for slot, value in zip(outputs, results):
                values[slot] = value
            for slot in free:
                values[slot] = None
        return fx.node.map_aggregate(self.result, lambda s: values[s.index] if isinstance(s, _Slot) else s)


@dataclass(frozen=True)
class _Slot:
    index: int


def compile_shared_blocks(graph: Graph, example_inputs: Sequence[Any],
                          compile_fn: Callable | None = None) -> SharedBlockProgram | None:
    """Compile ``graph`` piece by piece with Inductor (``compile_fn``: compile_fx), each distinct
    piece once. None when the graph does not qualify (see the module's docstring)."""
    if compile_fn is None:
        from torch._inductor.compile_fx import compile_fx as compile_fn
    reason = _why_not(graph, example_inputs)
    if reason is None:
        pieces = split_at_blocks(graph)
        reason = _why_not_pieces(graph, pieces)
    if reason is not None:
        log.debug("lqc: %s compiles whole: %s", graph.name, reason)
        return None

    slot_of: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op != "output":
            slot_of[node] = len(slot_of)
    placeholders = {n.name: n for n in graph.placeholders()}
    user_nodes = [placeholders[i.name] for i in graph.inputs]
    real: dict[fx.Node, Any] = dict(zip(user_nodes, example_inputs))
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            real[node] = constants[slot_of[node]] = graph.constant(node)

    output = graph.output_node()
    last_read: dict[fx.Node, int] = {}
    for index, piece in enumerate(pieces):
        for value in piece.inputs:
            last_read[value] = index
    kept = set(output.all_input_nodes) | set(real)  # graph outputs, inputs and constants are never freed

    compiled: dict[str, Callable] = {}
    steps = []
    for index, piece in enumerate(pieces):
        module = piece_module(piece)
        args = [real[v] if v in real else _example(v) for v in piece.inputs]
        key = signature(module, args)
        if key is None or key not in compiled:
            # outside dynamo's tracing context: its shape environment would take the made-up
            # inputs' sizes for symbols of the frame it guards (they have no source there)
            with torch._guards.tracing(None):
                fn = compile_fn(module, args)
            if key is None:
                key = f"unshared {index}"
            compiled[key] = fn
        free = [slot_of[v] for v, last in last_read.items() if last == index and v not in kept]
        steps.append((piece.key, compiled[key], [slot_of[v] for v in piece.inputs], [slot_of[v] for v in piece.outputs], free))
    result = fx.node.map_arg(output.args[0], lambda n: _Slot(slot_of[n]))
    log.debug("lqc: %s: %d pieces, %d compiled", graph.name, len(pieces), len(compiled))
    return SharedBlockProgram(graph, steps, len(slot_of), [slot_of[n] for n in user_nodes], constants, result, len(compiled))


def _example(node: fx.Node) -> torch.Tensor:
    """A tensor like the one ``node`` computes (its shape propagation value), zeros: what Inductor
    compiles a piece for (it reads shapes and strides, not values)."""
    val = node.meta["val"]
    return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device).zero_()


def _why_not(graph: Graph, example_inputs: Sequence[Any]) -> str | None:
    if len(graph.regions_of_kind("block")) < MIN_BLOCKS:
        return f"fewer than {MIN_BLOCKS} decoder blocks"
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        return "an input is not a tensor (a symbolic size)"
    for node in graph.nodes:
        if node.op == "get_attr" and not isinstance(graph.constant(node), torch.Tensor):
            return f"constant {node.target} is not a tensor"
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and any(not isinstance(d, int) for d in val.shape):
            return f"{node.name} has a symbolic shape"
    return None


def _why_not_pieces(graph: Graph, pieces: list[Piece]) -> str | None:
    if sum(p.key.startswith("block") for p in pieces) < MIN_BLOCKS:
        return "its blocks' nodes are not contiguous"
    real = {n for n in graph.nodes if n.op in ("placeholder", "get_attr")}
    for piece in pieces:
        for value in piece.inputs:
            if value not in real and not isinstance(value.meta.get("val"), torch.Tensor):
                return f"{value.name} crosses a cut and is not a tensor"
        for node in piece.nodes:
            for mutated in _mutated_args(node):
                if mutated not in piece.nodes and mutated not in real:
                    # an example input made up for the piece would not carry the aliasing it has at run time
                    return f"{node.name} mutates {mutated.name}, computed in an earlier piece"
    return None


def _mutated_args(node: fx.Node) -> list[fx.Node]:
    """The node arguments ``node`` writes to: an in-place method's receiver, an op's mutable arguments."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        name = getattr(node.target, "__name__", "")
        return [node.args[0]] if name.endswith("_") and not name.endswith("__") and node.args \
            and isinstance(node.args[0], fx.Node) else []
    mutated = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            if isinstance(value, fx.Node):
                mutated.append(value)
    return mutated
