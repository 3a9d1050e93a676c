"""``ffn_to_moe``: carve each dense FFN into shared experts plus routed experts, without training.

An FFN ``down(h(x))`` with n hidden neurons is a sum over its neurons, so cutting the neurons
into groups and adding the groups' outputs changes nothing. Most neurons are near zero on any
given token, so skipping the groups a token barely uses costs little. Per FFN:

1. One interpreted run over calibration windows records the FFN's input x and hidden activations h.
2. The neurons are cut into ``experts`` equal groups (lqc.passes.structural.expert_partition): the
   ``shared`` groups with the highest activation rates stay always on; the rest are clustered by
   activation pattern (balanced k-means), or cut at random (``partition: random``, the baseline).
3. The router scores each routed expert from x. It starts from each expert's representative
   neuron (its most active one: that neuron's gate, or up, weight row) and is then refined by
   least squares to predict the expert's activation mass ``sum |h_i|`` over its neurons.
4. The graph keeps the shared neurons in its own linears (their weights sliced) and adds
   ``lqc::moe_ffn`` for the routed ones, ``top_k`` per token (all: the dense FFN).

Recognised FFNs: gated (SwiGLU: ``down(act(gate(x)) * up(x))``) and plain
(``down(act(up(x) + b))``, GPT-2 and BERT), any linear spelling (lqc.ir.linear). The activation
is identified by running the graph's own nodes between the linears on a probe (silu, gelu,
gelu-tanh, relu); an FFN it cannot recognise (Phi-3's fused gate/up) is left dense, warned.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from lqc.ir import Graph, op_name
from lqc.ir.graph import clean_module_path
from lqc.ir.errors import LqcConfigError
from lqc.ir.linear import LinearSite, linear_site
from lqc.ir.provenance import derived_from

from lqc.passes.base import Pass, PassResult
from lqc.passes.structural.expert_partition import partition_neurons
from lqc.passes.numerics import clone_inputs
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass

_PROBES = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class FfnToMoeOptions(PassOptions):
    experts: int = field(default=8, metadata={"help": "equal-size groups the FFN's neurons are cut into, shared ones included"})
    shared: int = field(default=1, metadata={"help": "groups that are always active (the most frequently active neurons)"})
    top_k: int = field(default=3, metadata={"help": "routed experts active per token"})
    partition: Literal["cluster", "random"] = field(
        default="cluster", metadata={"help": "cluster: balanced k-means on activation patterns; random: the baseline"}
    )
    refine_router: bool = field(default=True, metadata={"help": "refine the representative-neuron router by least squares"})
    tokens: int = field(default=4096, metadata={"help": "calibration tokens for the statistics"})
    seed: int = field(default=0, metadata={"help": "seed of the clustering's start (and of the random partition)"})


@dataclass
class FfnToMoeReport:
    layers: list[dict]  # per FFN carved: {"layer", and its carve's figures (router recall, FLOPs, ...)}
    active_fraction: float  # (shared + top_k) / experts
    ffn_flops_per_token_dense: int  # summed over the carved FFNs
    ffn_flops_per_token_moe: int


@dataclass
class FfnSite:
    """One FFN in the graph: ``down(hidden)``, hidden = ``act(gate(x)) * up(x)`` or ``act(up(x))``."""

    x: fx.Node
    up: LinearSite
    gate: LinearSite | None
    down: LinearSite
    activation: str
    name: str


@dataclass
class Carve:
    """The cached outcome for one FFN: its experts, router and sliced weights."""

    shared: torch.Tensor  # neuron indices
    groups: torch.Tensor  # [routed experts, size]
    experts: dict  # lqc::moe_ffn's constants: router_weight, router_bias, w_in, w_gate, b_in, w_out
    report: dict


@register_pass
class FfnToMoe(Pass):
    name = "ffn_to_moe"
    description = "carve dense FFNs into shared + routed experts with a least-squares router (calibrated, no training)"
    Options = FfnToMoeOptions
    requires = frozenset({"calibration"})

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        o = self.options
        if o.experts < 1 or not 0 <= o.shared < o.experts:
            raise LqcConfigError(
                f"pass 'ffn_to_moe': needs experts >= 1 and 0 <= shared < experts (got experts {o.experts}, shared {o.shared})"
            )
        if not 1 <= o.top_k <= o.experts - o.shared:
            raise LqcConfigError(
                f"pass 'ffn_to_moe': top_k {o.top_k} must be between 1 and the {o.experts - o.shared} routed experts "
                f"(experts - shared)"
            )

    @property
    def active_fraction(self) -> float:
        o = self.options
        return (o.shared + o.top_k) / o.experts

    def run(self, graph: Graph, ctx) -> PassResult:
        sites = []
        for site in selected_ffn_sites(graph, self):
            width = graph.constant(site.up.weight).numel() // site.x.meta["val"].shape[-1]
            if width % self.options.experts:
                raise LqcConfigError(
                    f"pass 'ffn_to_moe': {site.name} has {width} neurons, not a multiple of experts={self.options.experts}; "
                    f"choose a number of experts that divides {width}"
                )
            sites.append(site)
        if not sites:
            return PassResult(message="no FFN to carve")

        sources = [s.weight for site in sites for s in (site.up, site.gate, site.down) if s is not None]
        key = ("carve", tuple(site.name for site in sites))

        def carve_all():
            inputs = ctx.calibration_inputs(graph, tokens=self.options.tokens)
            recorded = record_ffns(graph, sites, inputs, self.options.tokens, progress=ctx.progress)
            return {site.name: self._carve(graph, site, *recorded[site.name]) for site in sites}

        carves = ctx.transform(graph, key, sources, carve_all)
        rows = []
        for site in sites:
            carve = carves[site.name]
            _rewrite(graph, site, carve, self.options.shared, self.options.top_k)
            rows.append({"layer": site.name, **carve.report})
        dense = sum(r["ffn_flops_per_token_dense"] for r in rows)
        moe = sum(r["ffn_flops_per_token_moe"] for r in rows)
        details = FfnToMoeReport(layers=rows, active_fraction=self.active_fraction,
                                 ffn_flops_per_token_dense=dense, ffn_flops_per_token_moe=moe)
        message = (f"carved {len(rows)} FFNs into {self.options.experts} experts ({self.options.shared} shared, "
                   f"top {self.options.top_k}): {self.active_fraction:.0%} of neurons active, FFN FLOPs/token {dense:,} -> {moe:,}")
        return PassResult(matches=len(rows), details=details, message=message)

    def _carve(self, graph: Graph, site: FfnSite, x: torch.Tensor, hidden: torch.Tensor) -> Carve:
        o = self.options
        shared, groups, rate = partition_neurons(hidden, o.experts, o.shared, self.active_fraction, method=o.partition, seed=o.seed)
        w_select = (site.gate or site.up).weight_tensor(graph).to(torch.float32)
        b_select = graph.constant(site.up.bias).to(torch.float32) if site.gate is None and site.up.bias is not None else None
        # representative neuron of each expert: its most frequently active one
        reps = torch.stack([g[rate[g].argmax()] for g in groups]) if len(groups) else groups.new_zeros(0)
        initial_w = w_select[reps]
        initial_b = b_select[reps] if b_select is not None else torch.zeros(len(reps))
        mass = torch.stack([hidden[:, g].abs().sum(dim=1) for g in groups], dim=1) if len(groups) else hidden[:, :0]
        if o.refine_router and len(groups):
            router_w, router_b = least_squares_router(x, mass)
        else:
            router_w, router_b = initial_w, initial_b
        d = x.shape[1]
        n = hidden.shape[1]
        per_neuron = 2 * d * (3 if site.gate is not None else 2)
        size = n // o.experts
        report = {
            "neurons": n, "expert_size": size, "shared_neurons": len(shared), "routed_experts": len(groups),
            "active_fraction": (len(shared) + o.top_k * size) / n,
            "router_recall_initial": router_recall(x, mass, initial_w, initial_b, o.top_k),
            "router_recall": router_recall(x, mass, router_w, router_b, o.top_k),
            "ffn_flops_per_token_dense": per_neuron * n,
            "ffn_flops_per_token_moe": per_neuron * (len(shared) + o.top_k * size) + 2 * d * len(groups),
        }
        # the experts' weights are built here, once per model, and shared by every graph;
        # the shared experts come first, as lqc::moe_ffn expects
        order = torch.cat([shared.reshape(o.shared, size), groups]) if o.shared else groups
        up_w, down_w = site.up.weight_tensor(graph), site.down.weight_tensor(graph)
        gate_w = site.gate.weight_tensor(graph) if site.gate is not None else None
        up_b = graph.constant(site.up.bias) if site.up.bias is not None else None
        experts = {
            "router_weight": router_w.to(up_w.dtype).contiguous(),
            "router_bias": router_b.to(up_w.dtype).contiguous(),
            "w_in": up_w[order].contiguous(),
            "w_gate": gate_w[order].contiguous() if gate_w is not None else None,
            "b_in": up_b[order].contiguous() if up_b is not None else None,
            "w_out": down_w[:, order].permute(1, 0, 2).contiguous(),
        }
        return Carve(shared, groups, experts, report)


def least_squares_router(x: torch.Tensor, mass: torch.Tensor, damping: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (weight [E, d], bias [E]) whose scores best predict each expert's activation mass
    ``mass`` [tokens, E] from x [tokens, d], in the least-squares sense (ridge-damped, float64)."""
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    a = torch.cat([x.to(torch.float64), ones], dim=1)
    gram = a.T @ a
    gram += damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    solution = torch.linalg.solve(gram, a.T @ mass.to(torch.float64))  # [d + 1, E]
    return solution[:-1].T.to(torch.float32), solution[-1].to(torch.float32)


def router_recall(x: torch.Tensor, mass: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> float:
    """Fraction of each token's top_k experts by true activation mass that the router picks."""
    if mass.shape[1] == 0:
        return 1.0
    truth = mass.topk(top_k, dim=1).indices
    picked = F.linear(x.to(torch.float32), weight, bias).topk(top_k, dim=1).indices
    hits = (truth[:, :, None] == picked[:, None, :]).any(dim=2).float()
    return round(hits.mean().item(), 4)


def selected_ffn_sites(graph: Graph, p: Pass) -> list[FfnSite]:
    """The FFNs of the regions pass ``p`` selects; one it cannot recognise stays dense, with a warning."""
    sites, regions = [], graph.regions_of_kind("ffn")
    if not regions:
        warnings.warn(f"lqc {p.name}: {graph.name} has no FFN (linears around an activation in a block with attention)"
                      f": left as it was", stacklevel=4)
    for region in regions:
        if not p.selects(region.path):
            continue
        site, reason = ffn_site(graph, region)
        if site is None:
            warnings.warn(f"lqc {p.name}: {region.path} left dense: {reason}", stacklevel=4)
            continue
        sites.append(site)
    return sites


def ffn_site(graph: Graph, region) -> tuple[FfnSite | None, str]:
    """The FFN of an ``ffn`` region, or (None, why not)."""
    members = set(region.nodes)
    sites = [s for n in graph.nodes if n.name in members and (s := linear_site(n)) is not None]
    if len(sites) not in (2, 3):
        return None, f"{len(sites)} linears (an FFN has 2 or 3)"
    # the output linear is the one whose input is computed from another linear's output
    def reads_another(s: LinearSite) -> bool:
        return any(t is not s and (s.x is t.node or _between(t.node, s.x) is not None) for t in sites)

    downs = [s for s in sites if reads_another(s)]
    first = [s for s in sites if not reads_another(s)]
    if len(downs) != 1 or not first or any(s.x is not first[0].x for s in first):
        return None, "its linears are not input linear(s) on one input, then one output linear"
    x = first[0].x
    down, hidden = downs[0], downs[0].x
    name = region.path
    if len(first) == 1:
        up = first[0]
        activation = _identify(graph, up.node, hidden)
        if activation is None and any(op_name(n) in ("chunk", "split", "getitem") for n in _between(up.node, hidden) or []):
            return None, ("its gate and up projections are one fused linear, split in two (Phi-3's gate_up_proj): "
                          "not carved yet")
        if activation is None:
            return None, "the activation between its linears is not silu, gelu, gelu-tanh or relu"
        return FfnSite(x, up, None, down, activation, name), ""
    if op_name(hidden) != "mul" or len(hidden.args) != 2:
        return None, "its two input linears do not meet in a product (not a gated FFN)"
    a, b = hidden.args
    for gate, up in ((first[0], first[1]), (first[1], first[0])):
        other = b if a is up.node else a if b is up.node else None
        if other is None:
            continue
        activation = _identify(graph, gate.node, other)
        if activation is not None:
            return FfnSite(x, up, gate, down, activation, name), ""
    return None, "the gate's activation is not silu, gelu, gelu-tanh or relu"


def _identify(graph: Graph, start: fx.Node, end: fx.Node) -> str | None:
    """Which of _PROBES the nodes from ``start`` to ``end`` compute, elementwise, or None."""
    if start is end:
        return None
    between = _between(start, end)
    if between is None:
        return None
    sub = fx.Graph()
    env = {start: sub.placeholder("v")}
    for node in between:
        try:
            env[node] = sub.node_copy(node, lambda n: env[n])
        except KeyError:
            return None  # reads something other than the chain and constants: not elementwise
    sub.output(env[end])
    module = fx.GraphModule(graph.gm, sub)
    val = start.meta.get("val")
    shape = tuple(val.shape) if val is not None and all(isinstance(d, int) for d in val.shape) else (97,)
    # shaped like the real value, so views with the graph's sizes run
    probe = torch.linspace(-6, 6, math.prod(shape), dtype=torch.float64).reshape(shape)
    try:
        got = module(probe.to(val.dtype if val is not None else torch.float32)).to(torch.float64).reshape(-1)
    except Exception:  # noqa: BLE001 - anything that cannot run on a probe is not an activation we know
        return None
    for name, fn in _PROBES.items():
        if got.numel() == probe.numel() and torch.allclose(got, fn(probe).reshape(-1), atol=1e-4, rtol=1e-4):
            return name
    return None


def _between(start: fx.Node, end: fx.Node, limit: int = 32) -> list[fx.Node] | None:
    """Nodes on paths from start to end (end included), in graph order; None if too many."""
    forward = set()
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user not in forward:
                forward.add(user)
                if len(forward) > 4 * limit:
                    return None
                if user is not end:
                    frontier.append(user)
    if end not in forward:
        return None
    backward, frontier = set(), [end]
    while frontier:
        node = frontier.pop()
        if node in backward or node not in forward:
            continue
        backward.add(node)
        frontier.extend(a for a in node.all_input_nodes if a is not start)
    chain = [n for n in end.graph.nodes if n in backward]
    return chain if len(chain) <= limit else None


# -- statistics ------------------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    def __init__(self, graph: Graph, watched: dict[fx.Node, list]):
        super().__init__(graph.gm, garbage_collect_values=True)
        self.watched = watched

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        store = self.watched.get(node)
        if store is not None:
            store.append(result.detach().reshape(-1, result.shape[-1]).to(torch.float32))
        return result


@torch.no_grad()
def record_ffns(graph: Graph, sites: list[FfnSite], inputs, tokens: int, *, progress: bool = True) -> dict[str, tuple]:
    """Per FFN name: (x [T, d], hidden [T, n]) over the calibration inputs, the same T token rows."""
    watched: dict[fx.Node, list] = {}
    for site in sites:
        watched.setdefault(site.x, [])
        watched.setdefault(site.down.x, [])
    recorder = _Recorder(graph, watched)
    for args in tqdm(inputs, desc="ffn statistics", disable=not progress, leave=False):
        recorder.run(*clone_inputs(args))
    joined = {node: torch.cat(rows)[:tokens] for node, rows in watched.items()}
    return {site.name: (joined[site.x], joined[site.down.x]) for site in sites}


# -- rewriting -------------------------------------------------------------------------------------
def _rewrite(graph: Graph, site: FfnSite, carve: Carve, shared: int, top_k: int) -> None:
    """The FFN's nodes from its input to its down projection become one lqc::moe_ffn (plus the
    down projection's bias)."""
    g = graph.gm.graph
    dense = set(_between(site.x, site.down.node, limit=64) or [site.down.node])
    with derived_from(graph, [n for s in (site.up, site.gate, site.down) if s is not None for n in (s.node, s.weight)]):
        nodes = {k: (graph.add_constant(v, f"{site.name}.experts.{k}", before=site.down.node) if v is not None else None)
                 for k, v in carve.experts.items()}
        with g.inserting_after(site.down.node):
            out = moe = g.call_function(
                torch.ops.lqc.moe_ffn.default,
                (site.x, nodes["router_weight"], nodes["router_bias"], nodes["w_in"], nodes["w_gate"], nodes["b_in"],
                 nodes["w_out"], shared, top_k, site.activation),
            )
        _like(moe, site.down.node, module=site.name)
        if site.down.bias is not None:
            with g.inserting_after(moe):
                out = g.call_function(operator.add, (moe, site.down.bias))
            _like(out, site.down.node)
    site.down.node.replace_all_uses_with(out)
    for node in reversed(list(graph.nodes)):
        if node in dense and not node.users:
            g.erase_node(node)
    graph.prune_constants()


def _like(node: fx.Node, model: fx.Node, module: str | None = None) -> None:
    """Give a new node the module stack and value metadata of the node it stands beside; with
    ``module``, the stack ends at that module (the FFN, not its down projection)."""
    stack = dict(model.meta.get("nn_module_stack", {}))
    if module is not None:
        paths = [clean_module_path(path) for path, _cls in stack.values()]
        if module in paths:
            stack = dict(list(stack.items())[: paths.index(module) + 1])
    node.meta["nn_module_stack"] = stack
    if "val" in model.meta:
        node.meta["val"] = model.meta["val"]
