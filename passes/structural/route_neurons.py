"""``route_neurons``: an FFN as a Mixture-of-Experts whose experts are single neurons, routed
per token by the FFN's own gate. No training.

Why not experts of many neurons: on SmolLM2-135M the neurons a token uses do not come in groups.
Keeping each token's best 50% of neurons (by |down input|) costs +2.4% perplexity; keeping the
best 50% of 64 fixed groups of 24 neurons, chosen by an oracle that knows each group's true
output, costs +217% (benchmarks/results/smollm2-moe-diagnosis.md). So the unit of routing is the
neuron, and the router must see every neuron: the gate projection is that router (CMoE's
analytic router, taken to experts of size one; CATS's gate threshold). Per FFN:

1. One interpreted run over calibration windows records the FFN's input x (lqc's
   ``record_ffns``); from it each neuron's typical up magnitude ``mean |up_i(x)|``.
2. A neuron's score on a token is ``|act(gate_i(x))| * mean|up_i| * ||down[:, i]||``: how far
   the gate opens it, times what it usually writes into the stream when open.
3. The graph gets ``lqc::keep_top_neurons`` between the FFN's product and its down projection:
   per token, the ``active`` fraction of neurons with the best scores keep their value and the
   rest become 0.
4. ``bias`` (FLAP): the skipped neurons' mean contribution over the calibration tokens is added
   after the down projection as a constant.
5. ``per_layer``: the FFNs keep different fractions, the same total, split by their measured
   sensitivity (lqc.passes.structural.neuron_budget).

The gate, up and down linears stay ordinary linears (quantize, codegen and save/load see them
as before). Recognised FFNs are those of ``ffn_to_moe`` (gated and plain; for a plain FFN the
activation itself is the gate).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from lqc.ir import Graph
from lqc.ir.errors import LqcConfigError
from lqc.ir.provenance import derived_from

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass
from lqc.passes.structural.ffn_to_moe import _PROBES, FfnSite, ffn_site, record_ffns, selected_ffn_sites
from lqc.passes.structural.neuron_budget import allocate, candidate_steps


@dataclass
class RouteNeuronsOptions(PassOptions):
    active: float = field(default=0.5, metadata={"help": "fraction of each FFN's neurons active per token (0 < active <= 1)"})
    bias: bool = field(default=True, metadata={"help": "add the skipped neurons' mean contribution after the down projection"})
    per_layer: bool = field(default=False, metadata={"help": "split the neurons between FFNs by measured sensitivity (same total)"})
    step: float = field(default=0.125, metadata={"help": "per_layer: the fractions tried are active +- step and +- 2 step"})
    per_layer_tokens: int = field(default=1024, metadata={"help": "per_layer: calibration tokens each trial's KL is measured on"})
    tokens: int = field(default=4096, metadata={"help": "calibration tokens for the statistics"})


@dataclass
class RouteNeuronsReport:
    layers: list[dict]  # per FFN: {"layer", "neurons", "active_neurons", "bias_norm"}
    active_fraction: float  # kept neurons over all neurons, all routed FFNs together
    ffn_weights_read_fraction: float  # gate in full, up and down for the active neurons (gated FFNs)


@register_pass
class RouteNeurons(Pass):
    name = "route_neurons"
    description = "route each token to its most active FFN neurons, the gate as router (experts of one neuron; calibrated)"
    Options = RouteNeuronsOptions
    requires = frozenset({"calibration"})

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        if not 0 < self.options.active <= 1:
            raise LqcConfigError(f"pass 'route_neurons': active is {self.options.active}; it must be in (0, 1], "
                                 f"e.g. 0.5 for half of each FFN's neurons")
        if not 0 < self.options.step < 1:
            raise LqcConfigError(f"pass 'route_neurons': step is {self.options.step}; it must be in (0, 1), e.g. 0.125")

    def run(self, graph: Graph, ctx) -> PassResult:
        sites = selected_ffn_sites(graph, self)
        if not sites:
            return PassResult(message="no FFN to route")
        sources = [s.weight for site in sites for s in (site.up, site.gate, site.down) if s is not None]

        def fit_all():
            inputs = ctx.calibration_inputs(graph, tokens=self.options.tokens)
            recorded = record_ffns(graph, sites, inputs, self.options.tokens, progress=ctx.progress)
            fits = {site.name: self._fit(graph, site, recorded[site.name][0]) for site in sites}
            chosen = {name: fit[2][0] for name, fit in fits.items()}  # uniform: the target fraction
            if self.options.per_layer:
                chosen = self._allocate(graph, sites, fits, ctx)
            return {name: (weight, biases, chosen[name]) for name, (weight, biases, _) in fits.items()}

        fits = ctx.transform(graph, ("route", tuple(site.name for site in sites)), sources, fit_all)
        rows, read, total, kept = [], 0.0, 0.0, 0
        for site in sites:
            weight, biases, k = fits[site.name]
            _rewrite(graph, site, weight, biases[k] if self.options.bias else None, k)
            n = weight.numel()
            kept += k
            rows.append({"layer": site.name, "neurons": n, "active_neurons": k,
                         "bias_norm": round(float(biases[k].norm()), 4) if self.options.bias else 0.0})
            matrices = 3 if site.gate is not None else 2
            read += (matrices - 2) * n + 2 * k  # the gate in full; up and down for the active neurons
            total += matrices * n
        active = kept / sum(r["neurons"] for r in rows)
        details = RouteNeuronsReport(layers=rows, active_fraction=round(active, 4), ffn_weights_read_fraction=round(read / total, 4))
        split = f" (per layer {min(r['active_neurons'] / r['neurons'] for r in rows):.0%}..{max(r['active_neurons'] / r['neurons'] for r in rows):.0%})" if self.options.per_layer else ""
        message = (f"routed {len(rows)} FFNs neuron by neuron: {active:.0%} of neurons active per token{split}, "
                   f"{details.ffn_weights_read_fraction:.0%} of FFN weights read")
        return PassResult(matches=len(rows), details=details, message=message)

    def _allocate(self, graph: Graph, sites: list[FfnSite], fits: dict, ctx) -> dict[str, int]:
        """k per FFN from route_neurons' per-layer search (lqc.passes.structural.neuron_budget), run on
        a copy of the graph with every FFN routed."""
        trial = graph.copy()
        routed = []
        for region in trial.regions_of_kind("ffn"):
            site, _ = ffn_site(trial, region)
            if site is None or site.name not in fits:
                continue
            weight, biases, ks = fits[site.name]
            bias = biases[ks[0]].clone() if self.options.bias else None
            node, bias_node = _rewrite(trial, site, weight, bias, ks[0])
            routed.append((node, trial.constant(bias_node) if bias_node is not None else None, biases))
        inputs = ctx.calibration_inputs(trial, tokens=self.options.per_layer_tokens)
        with tqdm(total=len(routed), desc="route_neurons per-layer split", disable=not ctx.progress, leave=False) as bar:
            chosen = allocate(trial, routed, self.options.active, self.options.step, inputs, progress=bar)
        return {node.meta["lqc_routed"]["layer"]: k for (node, _, _), k in zip(routed, chosen)}

    @torch.no_grad()
    def _fit(self, graph: Graph, site: FfnSite, x: torch.Tensor) -> tuple[torch.Tensor, dict, list[int]]:
        """(neuron_weight [n], {k: bias [d_out]}, candidate ks, the target's first) for one FFN from
        its calibration inputs x [T, d]."""
        act = _PROBES[site.activation]
        up_w = site.up.weight_tensor(graph).to(torch.float32)
        up_b = graph.constant(site.up.bias).to(torch.float32) if site.up.bias is not None else None
        down_w = site.down.weight_tensor(graph).to(torch.float32)
        pre = F.linear(x, up_w, up_b)
        if site.gate is not None:
            gate = act(F.linear(x, site.gate.weight_tensor(graph).to(torch.float32)))
            hidden = gate * pre
            weight = pre.abs().mean(dim=0) * down_w.norm(dim=0)
        else:
            gate = hidden = act(pre)
            weight = down_w.norm(dim=0)
        n = hidden.shape[1]
        o = self.options
        steps = candidate_steps(o.active, o.step) if o.per_layer else [0]
        ks = sorted({max(1, min(n, round((o.active + s * o.step) * n))) for s in steps},
                    key=lambda k: k != max(1, min(n, round(o.active * n))))
        biases = {}
        for k in ks:
            kept = torch.ops.lqc.keep_top_neurons(hidden, gate, weight, k)
            biases[k] = F.linear((hidden - kept).mean(dim=0), down_w).contiguous()
        return weight.contiguous(), biases, ks


def _rewrite(graph: Graph, site: FfnSite, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> tuple[fx.Node, fx.Node | None]:
    """``down(hidden)`` becomes ``down(keep_top_neurons(hidden, gate, weight, k)) [+ bias]``; returns
    the keep_top_neurons node and the bias constant's node (None without bias)."""
    g = graph.gm.graph
    down = site.down.node
    hidden = site.down.x
    if site.gate is not None:
        a, b = hidden.args
        gate = b if a is site.up.node else a
    else:
        gate = hidden
    dtype = hidden.meta["val"].dtype if "val" in hidden.meta else torch.float32
    with derived_from(graph, [n for s in (site.up, site.gate, site.down) if s is not None for n in (s.node, s.weight)]):
        weight_node = graph.add_constant(weight.to(dtype), f"{site.name}.neuron_weight", before=down)
        with g.inserting_before(down):
            kept = g.call_function(torch.ops.lqc.keep_top_neurons.default, (hidden, gate, weight_node, k))
        kept.meta.update({key: hidden.meta[key] for key in ("val", "nn_module_stack") if key in hidden.meta})
        # what lqc.save stores for this FFN (lqc.serialize)
        kept.meta["lqc_routed"] = {"layer": site.name, "k": k, "gated": site.gate is not None,
                                   "neuron_weight": weight_node.target, "skipped_bias": None}
        down.replace_input_with(hidden, kept)
        if bias is not None:
            bias_node = graph.add_constant(bias.to(dtype), f"{site.name}.skipped_bias", before=down)
            kept.meta["lqc_routed"]["skipped_bias"] = bias_node.target
            with g.inserting_after(down):
                out = g.call_function(operator.add, (down, bias_node))
            out.meta.update({key: down.meta[key] for key in ("val", "nn_module_stack") if key in down.meta})
            for user in list(down.users):
                if user is not out:
                    user.replace_input_with(down, out)
    return kept, (bias_node if bias is not None else None)
