"""A fusion group's epilogue as a small program: Triton source for the kernel, torch for checking.

The partitioner hands a group its epilogue as FX nodes (bias add, activation, cast, the SwiGLU
multiply, the residual add). ``epilogue_program`` turns them into steps ``v_i = op(operands)``,
where an operand is the GEMM's accumulator, an earlier step, a tensor the kernel loads (a tile of
the output's shape, or a row vector broadcast over the rows), or a number. ``triton_lines``
writes the steps as Triton expressions; ``run_torch`` evaluates the same steps with torch, which
is both the CPU implementation and what the kernel is tested against.

A split of the GEMM's output into two halves on the last dimension, as the first step (concat_linears'
gate+up, ``act(y0) * y1``), makes the program read both halves (``halves``; operands ``half0`` /
``half1``): the kernel computes each output tile of both and writes only the combined result. The
split's nodes join the program only together with a step that reads both halves, so no half is
ever needed outside the kernel.

Anything the program cannot express (another split, a cast to a narrower type, an op without a
formula here) ends it: that node and the ones after it stay outside the kernel, computed by torch
on its output, so the result is right either way, only less fused.

Steps name no FX node: two groups that do the same work get the same program, the same source,
and one kernel (``signature``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from lqc.ir import op_name

# op -> (Triton expression, torch function); operands are {a}, {b}.
_UNARY: dict[str, tuple[str, Callable]] = {
    "silu": ("{a} / (1.0 + tl.exp(-{a}))", torch.nn.functional.silu),
    "sigmoid": ("1.0 / (1.0 + tl.exp(-{a}))", torch.sigmoid),
    "relu": ("tl.maximum({a}, 0.0)", torch.relu),
    # tl.tanh is not a Triton builtin; this is its definition.
    "tanh": ("2.0 / (1.0 + tl.exp(-2.0 * {a})) - 1.0", torch.tanh),
    "gelu": ("0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476))", lambda a: torch.nn.functional.gelu(a)),
    "gelu_tanh": (
        "0.5 * {a} * (2.0 / (1.0 + tl.exp(-2.0 * (0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a})))))",
        lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
    ),
    "identity": ("{a}", lambda a: a),
}
_BINARY: dict[str, tuple[str, Callable]] = {
    "add": ("({a} + {b})", torch.add),
    "sub": ("({a} - {b})", torch.sub),
    "mul": ("({a} * {b})", torch.mul),
    "div": ("({a} / {b})", torch.div),
}
# The kernel computes in float32: a cast to float32 (or wider) changes nothing there.
_LOSSLESS_CASTS = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Operand:
    kind: str  # "acc" | "half" | "step" | "tile" | "row" | "const"
    index: int = 0  # which step / which loaded input
    value: float = 0.0  # for "const"

    def text(self) -> str:
        return {"acc": "acc", "half": f"half{self.index}", "step": f"v{self.index}", "tile": f"in{self.index}:tile",
                "row": f"in{self.index}:row", "const": repr(float(self.value))}[self.kind]


@dataclass(frozen=True)
class Step:
    op: str
    operands: tuple[Operand, ...]


@dataclass
class EpilogueProgram:
    steps: list[Step] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)  # what the kernel loads: in0, in1, ...
    input_kinds: list[str] = field(default_factory=list)  # "tile" ([..., N]) or "row" ([N])
    nodes: list[fx.Node] = field(default_factory=list)  # the FX node each step computes
    stopped_at: fx.Node | None = None  # the first epilogue node left outside, if any
    stop_reason: str = ""
    halves: bool = False  # the steps read the two halves of the GEMM's output (its first node a split)

    @property
    def output(self) -> fx.Node | None:
        """The node whose value the kernel writes (None: the anchor's own)."""
        return self.nodes[-1] if self.nodes else None

    def signature(self) -> str:
        """The program's text without node names: equal programs make the same kernel."""
        steps = ";".join(f"v{i}={s.op}({','.join(o.text() for o in s.operands)})" for i, s in enumerate(self.steps))
        return ("split2;" if self.halves else "") + steps

    def triton_lines(self) -> list[str]:
        """Statements leaving the result in ``v<last>`` (or ``acc`` with no steps). They read ``acc``,
        ``offs_m``/``offs_n``/``mask_n``/``out_mask``, ``in<j>_ptr`` and its strides ``in<j>_sm``/``in<j>_sn``."""
        lines = []
        for j, kind in enumerate(self.input_kinds):
            if kind == "tile":
                lines.append(f"in{j} = tl.load(in{j}_ptr + offs_m[:, None] * in{j}_sm + offs_n[None, :] * in{j}_sn, "
                             f"mask=out_mask, other=0.0).to(tl.float32)")
            else:
                lines.append(f"in{j} = tl.load(in{j}_ptr + offs_n * in{j}_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]")
        for i, step in enumerate(self.steps):
            names = [_triton_operand(o) for o in step.operands]
            table = _UNARY if len(names) == 1 else _BINARY
            lines.append(f"v{i} = " + table[step.op][0].format(a=names[0], b=names[1] if len(names) > 1 else ""))
        lines.append(f"result = {'v%d' % (len(self.steps) - 1) if self.steps else 'acc'}")
        return lines

    def run_torch(self, acc: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The steps on ``acc`` ([..., N], float32) and the loaded inputs, with torch."""
        values: list[torch.Tensor] = []

        def value(o: Operand):
            if o.kind == "acc":
                return acc
            if o.kind == "half":
                return acc.chunk(2, dim=-1)[o.index]
            if o.kind == "step":
                return values[o.index]
            if o.kind in ("tile", "row"):
                return inputs[o.index].to(torch.float32)
            return o.value

        for step in self.steps:
            args = [value(o) for o in step.operands]
            table = _UNARY if len(args) == 1 else _BINARY
            values.append(table[step.op][1](*args))
        return values[-1] if values else acc


def _triton_operand(o: Operand) -> str:
    if o.kind == "acc":
        return "acc"
    if o.kind == "half":
        return "acc" if o.index == 0 else "acc1"
    if o.kind == "step":
        return f"v{o.index}"
    if o.kind in ("tile", "row"):
        return f"in{o.index}"
    return repr(float(o.value))


def epilogue_program(anchor: fx.Node, epilogue: list[fx.Node]) -> EpilogueProgram:
    """The longest prefix of ``epilogue`` (a group's epilogue nodes, in graph order, each reading
    the anchor or an earlier one) that the kernel can compute."""
    program = EpilogueProgram()
    out_shape = _shape(anchor)
    step_of: dict[fx.Node, int] = {}
    input_of: dict[fx.Node, int] = {}
    half_of: dict[fx.Node, int] = {}  # the getitems of a split into halves -> 0 / 1

    if epilogue and (halves := _split_in_halves(anchor, epilogue[0])) is not None:
        split, getitems = halves
        program.halves = True
        half_of = {getitem: index for index, getitem in getitems.items()}
        out_shape = _shape(getitems[0])
        epilogue = [n for n in epilogue[1:] if n not in half_of]

    def operand(arg: Any) -> Operand | None:
        if arg is anchor and not program.halves:
            return Operand("acc")
        if isinstance(arg, fx.Node) and arg in half_of:
            return Operand("half", half_of[arg])
        if isinstance(arg, fx.Node) and arg in step_of:
            return Operand("step", step_of[arg])
        if isinstance(arg, bool) or not isinstance(arg, (int, float, fx.Node)):
            return None
        if not isinstance(arg, fx.Node):
            return Operand("const", value=float(arg))
        shape = _shape(arg)
        if shape is None or out_shape is None or not _float(arg):
            return None
        if _same(shape, out_shape):
            kind = "tile"
        elif _same(shape, out_shape[-1:]):
            kind = "row"
        else:
            return None  # another broadcast: not one of the two layouts the kernel loads
        if arg not in input_of:
            input_of[arg] = len(program.inputs)
            program.inputs.append(arg)
            program.input_kinds.append(kind)
        return Operand(kind, input_of[arg])

    for node in epilogue:
        step, reason = _step_for(node, operand, out_shape)
        if step is None:
            program.stopped_at, program.stop_reason = node, reason
            break
        step_of[node] = len(program.steps)
        program.steps.append(step)
        program.nodes.append(node)
    if program.halves:
        halves_read = {o.index for step in program.steps for o in step.operands if o.kind == "half"}
        if halves_read != {0, 1}:
            # the kernel would have to write a half for the nodes left outside: keep the split out
            return EpilogueProgram(stopped_at=split, stop_reason="the steps after the split do not combine both halves")
        program.nodes = [split, *half_of, *program.nodes]
    return program


def _split_in_halves(anchor: fx.Node, node: fx.Node) -> tuple[fx.Node, dict[int, fx.Node]] | None:
    """(split, {0: getitem, 1: getitem}) when ``node`` splits the anchor's output into two equal
    halves on the last dimension and only those two getitems read it."""
    if op_name(node) not in ("split", "chunk") or node.all_input_nodes != [anchor]:
        return None
    halves, shape = node.meta.get("val"), _shape(anchor)
    if not (isinstance(halves, (tuple, list)) and len(halves) == 2 and shape):
        return None
    first, second = (tuple(h.shape) for h in halves)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim not in (-1, len(shape) - 1) or not _same(first, second) or str(first[-1] * 2) != str(shape[-1]):
        return None
    getitems = {u.args[1]: u for u in node.users if op_name(u) == "getitem" and len(u.args) == 2}
    if len(node.users) != 2 or set(getitems) != {0, 1}:
        return None
    return node, getitems


def _step_for(node: fx.Node, operand, out_shape) -> tuple[Step | None, str]:
    name = op_name(node)
    if _shape(node) is None or not _same(_shape(node), out_shape):
        return None, f"{name} changes the shape"
    if name in ("to", "type", "float", "double") or name == "_to_copy":
        dtype = _dtype(node)
        if dtype not in _LOSSLESS_CASTS:
            return None, f"a cast to {dtype}: the kernel computes in float32 and rounds only when it stores"
        src = operand(node.all_input_nodes[0]) if len(node.all_input_nodes) == 1 else None
        return (Step("identity", (src,)), "") if src is not None else (None, "cast of an unsupported operand")
    if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
        name = "gelu_tanh"
    if name in _UNARY and name != "identity":
        if len(node.args) != 1 or (set(node.kwargs) - {"approximate", "inplace"}) or node.kwargs.get("inplace"):
            return None, f"{name} with arguments {node.args[1:]} {node.kwargs}"
        a = operand(node.args[0])
        return (Step(name, (a,)), "") if a is not None else (None, f"{name} of an unsupported operand")
    if name in _BINARY:
        if len(node.args) != 2 or node.kwargs:
            return None, f"{name} with extra arguments ({node.kwargs})"
        a, b = operand(node.args[0]), operand(node.args[1])
        if a is None or b is None:
            return None, f"{name} of an operand the kernel cannot load (only [..., N] tiles, [N] rows and numbers)"
        return Step(name, (a, b)), ""
    return None, f"no epilogue formula for {name}"


def _shape(node) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _dtype(node: fx.Node):
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


def _float(node: fx.Node) -> bool:
    dtype = _dtype(node)
    return dtype is not None and dtype.is_floating_point


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))
