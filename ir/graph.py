"""The lqc Graph: an fx GraphModule whose weights are frozen named constants, plus what lqc knows
about it (where each input came from, which module each node belongs to, its regions).

Passes edit ``graph.gm.graph`` with the ordinary torch.fx API; this class adds the few things fx
does not know: constants named by their module path, the inputs' roles, and regions.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx

# Roles of user inputs, read off dynamo's source names (``L['kwargs']['input_ids']``) and the graph.
INPUT_ROLES = (
    "token_ids",  # integer ids feeding an embedding
    "position_ids",
    "cache_position",
    "attention_mask",
    "kv_cache",  # a tensor of a KV cache (dynamic cache tensors, static cache buffers)
    "cache_length",  # the static cache's cumulative_length counter
    "size",  # a SymInt dynamo passes for a symbolic dimension
    "other",
)


@dataclass
class GraphInput:
    """A user input of the graph (what stays a placeholder after freezing)."""

    name: str  # placeholder node name
    source: str  # dynamo's source, e.g. "L['kwargs']['input_ids']"; "" when unknown
    role: str  # one of INPUT_ROLES
    index: int  # position in the argument list dynamo calls the compiled graph with
    example: Any = None  # FakeTensor / SymInt / int used for shape propagation


@dataclass
class FrozenInput:
    """A dynamo argument that capture turned into a constant (a parameter or buffer)."""

    index: int  # position in dynamo's argument list
    attr: str  # buffer name on graph.gm
    tensor: torch.Tensor  # the argument itself; runtime checks identity and _version against it
    version: int


@dataclass
class Graph:
    gm: fx.GraphModule
    inputs: list[GraphInput]
    fake_mode: Any = None  # FakeTensorMode used for shape propagation (dynamo's, when captured by dynamo)
    constant_fqns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # buffer name -> module paths
    frozen: list[FrozenInput] = field(default_factory=list)
    num_args: int = 0  # how many arguments dynamo calls the graph with
    name: str = "graph"
    regions: list = field(default_factory=list)  # list[Region], filled by ir.regions.annotate_regions

    # -- nodes ---------------------------------------------------------------------------------
    @property
    def nodes(self) -> Iterable[fx.Node]:
        return self.gm.graph.nodes

    def find(self, name: str) -> fx.Node:
        for node in self.gm.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r} in {self.name}")

    def placeholders(self) -> list[fx.Node]:
        return list(self.gm.graph.find_nodes(op="placeholder"))

    def output_node(self) -> fx.Node:
        return self.gm.graph.output_node()

    # -- constants -----------------------------------------------------------------------------
    def constant(self, node_or_name: fx.Node | str) -> torch.Tensor:
        name = node_or_name.target if isinstance(node_or_name, fx.Node) else node_or_name
        return getattr(self.gm, name)

    def is_constant(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value.op == "get_attr"

    def fqns(self, node_or_name: fx.Node | str) -> tuple[str, ...]:
        """Module paths of a constant, e.g. ("model.embed_tokens.weight", "lm_head.weight") when tied."""
        name = node_or_name.target if isinstance(node_or_name, fx.Node) else node_or_name
        return self.constant_fqns.get(name, ())

    def constants(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Constants referenced by the graph, once each."""
        seen = set()
        for node in self.gm.graph.find_nodes(op="get_attr"):
            if node.target not in seen:
                seen.add(node.target)
                value = getattr(self.gm, node.target)
                if isinstance(value, torch.Tensor):
                    yield node.target, value

    def source_tensor(self, node_or_name: fx.Node | str) -> torch.Tensor:
        """The tensor a constant was frozen from (the model's own nn.Parameter), else the constant.

        Caches of transformed weights key on this object: it is the same across every graph
        dynamo captures from one model, while the constants are per-graph detached views.
        """
        name = node_or_name.target if isinstance(node_or_name, fx.Node) else node_or_name
        for frozen in self.frozen:
            if frozen.attr == name:
                return frozen.tensor
        return self.constant(name)

    def add_constant(
        self, tensor: torch.Tensor, name_hint: str, fqns: Iterable[str] = (), *, before: fx.Node | None = None
    ) -> fx.Node:
        """Register ``tensor`` as a constant and return a get_attr node for it.

        The node goes right before ``before`` (default: after the last placeholder).
        """
        name = self._unique_attr(sanitize(name_hint))
        self.gm.register_buffer(name, tensor)
        self.constant_fqns[name] = tuple(fqns)
        if before is None:
            placeholders = self.placeholders()
            before = placeholders[-1].next if placeholders else next(iter(self.gm.graph.nodes))
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.get_attr(name)

    def prune_constants(self) -> int:
        """Drop constants no node uses any more (their get_attr nodes too). Returns how many."""
        for node in list(self.gm.graph.find_nodes(op="get_attr")):
            if not node.users:
                self.gm.graph.erase_node(node)
        used = {n.target for n in self.gm.graph.find_nodes(op="get_attr")}
        dropped = [name for name, _ in self.gm.named_buffers(remove_duplicate=False) if name not in used and "." not in name]
        for name in dropped:
            delattr(self.gm, name)
            self.constant_fqns.pop(name, None)
        return len(dropped)

    def param_bytes(self) -> int:
        """Bytes of every constant the graph uses, as stored; tied weights count once."""
        seen, total = set(), 0
        for _, tensor in self.constants():
            key = (tensor.untyped_storage().data_ptr(), tensor.device)
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
        return total

    def _unique_attr(self, base: str) -> str:
        name, i = base, 1
        while hasattr(self.gm, name):
            name = f"{base}_{i}"
            i += 1
        return name

    # -- modules and regions -------------------------------------------------------------------
    @staticmethod
    def module_path(node: fx.Node) -> str:
        """The innermost module this node ran in, e.g. "model.layers.3.mlp.up_proj" ("" if none)."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return ""
        path, _cls = list(stack.values())[-1]
        return clean_module_path(path)

    @staticmethod
    def module_stack(node: fx.Node) -> list[tuple[str, type]]:
        """(path, class) of every module this node ran in, outermost first."""
        stack = node.meta.get("nn_module_stack") or {}
        return [(clean_module_path(path), cls) for path, cls in stack.values()]

    def region(self, node: fx.Node):
        """The innermost Region of ``node`` (None outside any region)."""
        return node.meta.get("lqc_region")

    def regions_of_kind(self, kind: str) -> list:
        return [r for r in self.regions if r.kind == kind]

    # -- running and copying ---------------------------------------------------------------------
    def recompile(self) -> None:
        self.gm.graph.lint()
        self.gm.recompile()

    def __call__(self, *user_inputs):
        return self.gm(*user_inputs)

    def copy(self, name: str | None = None) -> "Graph":
        """A structurally independent copy: nodes copied, constant tensors shared."""
        root = torch.nn.Module()
        for attr, tensor in self.gm.named_buffers(remove_duplicate=False):
            root.register_buffer(attr, tensor)
        gm = fx.GraphModule(root, copy.deepcopy(self.gm.graph))
        new = Graph(
            gm=gm,
            inputs=[copy.copy(i) for i in self.inputs],
            fake_mode=self.fake_mode,
            constant_fqns=dict(self.constant_fqns),
            frozen=list(self.frozen),
            num_args=self.num_args,
            name=name or self.name,
        )
        # node.meta is copied with the nodes, so each node keeps its lqc_region; Region holds names.
        new.regions = list(self.regions)
        return new


_SOURCE_PREFIX = re.compile(r"^(?:L|G)\['([^']+)'\]")
# The root module: ``L['self']`` when dynamo's frame is the forward itself, ``L['args'][0]`` when it is
# a ``(*args, **kwargs)`` wrapper around it (transformers >= 5.24 decorates forwards with
# ``deprecate_kwarg("past_key_values", new_name="cache")``, whose wrapper is the frame dynamo traces).
_SELF_ROOT = re.compile(r"^(?:L|G)\['self'\]|^L\['args'\]\[0\](?=\.|$)")
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.(\w+)|\[(\d+)\]|\['([^']+)'\]")


def fqn_from_source(source: str) -> str:
    """``L['self']._modules['model']._modules['layers']._modules['3']._parameters['weight']``
    -> ``model.layers.3.weight``. The root (``self``, or ``args[0]`` of a method's wrapper) is dropped;
    other roots are kept as the first part."""
    parts: list[str] = []
    rest = source
    if root := _SELF_ROOT.match(source):
        rest = source[root.end() :]
    elif match := _SOURCE_PREFIX.match(source):
        parts.append(match.group(1))
        rest = source[match.end() :]
    for m in _SOURCE_PART.finditer(rest):
        parts.append(next(g for g in m.groups() if g is not None))
    return ".".join(parts)


def clean_module_path(path: str) -> str:
    """dynamo's ``L['self'].model.layers.0`` (or ``L['args'][0].model.layers.0``) -> ``model.layers.0``."""
    return fqn_from_source(path) if path.startswith(("L[", "G[")) else path


def sanitize(name: str) -> str:
    """A valid Python identifier (buffer and node names) from a module path."""
    out = re.sub(r"\W", "_", name)
    return out if out and not out[0].isdigit() else f"c_{out}"
