"""``merge_branches``: parallel conv or linear branches on one input, summed, become one op.

Convolution and linear maps are linear in their weights, so branches that read the same input
``x`` and whose outputs are added are one op with the summed weights and biases:

    conv(x, W1, b1) + conv(x, W2, b2) = conv(x, W1 + W2, b1 + b2)

This is RepVGG's structural reparameterization (Ding et al., 2021): a training-time block of
3x3 conv+BN, 1x1 conv+BN and an identity BN is, at inference, one 3x3 conv. Run
``fold_batchnorm`` first; this pass then merges what is left. The merge is exact up to rounding
(weights are summed in float64, then cast back) when:

- every merged branch has no user but the sum, and the sum adds tensors of its own shape (no
  broadcasting) with no ``alpha``;
- convs share op (conv1d/conv2d), stride, dilation and groups. Kernels of different sizes are
  zero-padded to the largest: a smaller kernel sits at offset ``t = (P - p) / dilation`` inside
  the largest (P, p: the largest and the smaller kernel's padding), which must be a whole number
  with the smaller kernel inside, so each output position reads the same inputs as before; the
  extra taps weigh 0 (a 1x1 conv with padding 0 becomes a 3x3 with padding 1). All branch
  outputs have the same shape;
- an identity branch (``x`` itself in the sum) becomes an identity kernel (1 at the centre tap
  of each output channel's own input channel) when the op maps C channels to C, for any groups;
  for a conv the centre tap must exist (odd kernel, ``t`` as above);
- a BatchNorm on ``x`` alone in the sum (RepVGG's identity branch with its BN, which
  ``fold_batchnorm`` cannot fold: nothing is before or after it but the sum) is the per-channel
  affine ``a * x + c``: the identity kernel scaled by ``a``, plus ``c`` in the bias. For a linear,
  only on a 2-d ``x`` (BatchNorm's channels are dim 1, a linear's features the last dim).

Sums of more terms are taken apart (``a + b + c``) and other terms stay added to the merged op.
Anything else is left alone and counted under ``skipped``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph, op_name
from lqc.ir.linear import LinearSite, linear_site
from lqc.ir.ops import is_inplace
from lqc.ir.provenance import derived_from

from lqc.passes.base import Pass, PassResult
from lqc.passes.reparam.fold_batchnorm import BatchNormAffine, ConvSite, batch_norm_affine, batch_norm_args, bias_fqns, conv_site
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass


@dataclass
class MergeBranchesOptions(PassOptions):
    identity: bool = field(
        default=True,
        metadata={"help": "merge an identity branch (x, or an eval BatchNorm of x) as an identity kernel"},
    )
    pad_kernels: bool = field(
        default=True, metadata={"help": "merge convs of different kernel sizes by zero-padding the smaller kernels"}
    )


@dataclass
class MergeBranchesReport:
    merged: list[dict]  # {"sum", "input", "branches", "into": the merged op}
    skipped: list[dict]  # {"sum", "input", "reason"}


@dataclass
class _Branch:
    """One term of a sum that reads ``x``: a conv, a linear, ``x`` itself, or a BatchNorm of ``x``."""

    kind: str  # "conv", "linear", "identity", "batch_norm"
    node: fx.Node  # the term as it appears in the sum
    conv: ConvSite | None = None
    linear: LinearSite | None = None
    affine: BatchNormAffine | None = None
    weight: torch.Tensor | None = None  # conv/linear weight in float64, [out, in(/groups), *kernel]; read by _plan
    bias: torch.Tensor | None = None  # float64, or None

    def load(self, graph: Graph) -> None:
        # read lazily: most sums (transformer residuals) never get this far
        if self.conv is not None:
            self.weight = graph.constant(self.conv.weight).to(torch.float64)
            self.bias = graph.constant(self.conv.bias).to(torch.float64) if self.conv.bias is not None else None
        elif self.linear is not None:
            self.weight = self.linear.weight_tensor(graph).to(torch.float64)
            self.bias = graph.constant(self.linear.bias).to(torch.float64) if self.linear.bias is not None else None


@register_pass
class MergeBranches(Pass):
    name = "merge_branches"
    description = "sum parallel conv/linear branches on one input into one op (RepVGG): W = W1 + W2 (+ identity)"
    Options = MergeBranchesOptions

    def run(self, graph: Graph, ctx) -> PassResult:
        merged, skipped = [], []
        for node in list(graph.nodes):
            if not _is_plain_add(node) or _is_plain_add_of_tree(node):
                continue  # not a sum, or an inner add of a larger sum (its root handles it)
            if not self.selects(node):
                continue
            terms = _sum_terms(node)
            groups: dict[fx.Node, list[_Branch]] = {}
            for term in terms:
                for x, branch in self._branches(graph, term):
                    groups.setdefault(x, []).append(branch)
            done = set()
            rewrites = []
            for x, branches in groups.items():
                # each term joins at most one group; a merge needs a weighted op and a second term
                branches = [b for b in branches if b.node not in done]
                kinds = {b.kind for b in branches}
                if len(branches) < 2 or not kinds & {"conv", "linear"}:
                    continue
                plan, reason = self._plan(graph, x, branches, node)
                if plan is None:
                    skipped.append({"sum": _describe(graph, node), "input": x.name, "reason": reason})
                    continue
                done.update(b.node for b in branches)
                rewrites.append((x, branches, plan))
            if not rewrites:
                continue
            for x, branches, plan in rewrites:
                merged.append({
                    "sum": _describe(graph, node), "input": x.name,
                    "branches": [f"{b.kind}:{_describe(graph, b.node)}" for b in branches], "into": plan["describe"],
                })
            self._rewrite(graph, node, terms, rewrites)
        return PassResult(matches=len(merged), details=MergeBranchesReport(merged=merged, skipped=skipped))

    # -- which terms are branches ----------------------------------------------------------------
    def _branches(self, graph: Graph, term) -> list[tuple[fx.Node, _Branch]]:
        """(input, branch) pairs this term can be, for every input it could be grouped by."""
        if not isinstance(term, fx.Node):
            return []
        out = []
        single_use = len(term.users) == 1 and self.selects(term)
        if single_use and (conv := conv_site(term)) is not None:
            out.append((conv.x, _Branch("conv", term, conv=conv)))
        elif single_use and (site := linear_site(term)) is not None:
            out.append((site.x, _Branch("linear", term, linear=site)))
        elif single_use and self.options.identity and batch_norm_args(term) is not None:
            affine, _ = batch_norm_affine(graph, term)
            if affine is not None:
                out.append((affine.x, _Branch("batch_norm", term, affine=affine)))
        if self.options.identity:
            # the term may be the input of another branch: x + conv(x)
            out.append((term, _Branch("identity", term)))
        return out

    # -- whether and how a group merges ------------------------------------------------------------
    def _plan(self, graph: Graph, x: fx.Node, branches: list[_Branch], root: fx.Node) -> tuple[dict | None, str]:
        if any(is_inplace(user) and user.args and user.args[0] is x for user in x.users):
            # the merged op reads x where the sum was: a write into x in between would reach it
            return None, "the input is written in place"
        for b in branches:
            b.load(graph)
        out_val = root.meta.get("val")
        for b in branches:
            val = b.node.meta.get("val")
            if not isinstance(val, torch.Tensor) or not isinstance(out_val, torch.Tensor):
                return None, "shapes unknown"
            if tuple(val.shape) != tuple(out_val.shape) or val.dtype != out_val.dtype:
                return None, f"{op_name(b.node)} branch is broadcast or has another dtype"
        weighted = [b for b in branches if b.kind in ("conv", "linear")]
        if len({b.kind for b in weighted}) != 1:
            return None, "conv and linear branches on one input"
        if weighted[0].kind == "conv":
            return self._plan_conv(graph, x, branches)
        return self._plan_linear(graph, x, branches)

    def _plan_linear(self, graph: Graph, x: fx.Node, branches: list[_Branch]) -> tuple[dict | None, str]:
        weighted = [b for b in branches if b.kind == "linear"]
        shape = weighted[0].weight.shape
        if any(b.weight.shape != shape for b in weighted):
            return None, "linear weights of different shapes"
        weight = torch.zeros(shape, dtype=torch.float64)
        bias = None
        for b in branches:
            if b.kind == "linear":
                weight += b.weight
                bias = _add(bias, b.bias)
                continue
            if shape[0] != shape[1]:
                return None, "identity branch but the linears change the width"
            if b.kind == "batch_norm":
                if x.meta["val"].dim() != 2:
                    return None, "BatchNorm branch on a linear's input of more than 2 dims"
                weight += torch.diag(b.affine.scale)
                bias = _add(bias, b.affine.shift)
            else:
                weight += torch.eye(shape[0], dtype=torch.float64)
        site = weighted[0].linear
        dtype = graph.constant(site.weight).dtype
        return {"kind": "linear", "weight": weight, "bias": bias, "dtype": dtype, "like": site.weight,
                "bias_dtype": graph.constant(site.bias).dtype if site.bias is not None else dtype,
                "describe": f"linear {tuple(shape)}"}, ""

    def _plan_conv(self, graph: Graph, x: fx.Node, branches: list[_Branch]) -> tuple[dict | None, str]:
        convs = [b for b in branches if b.kind == "conv"]
        first = convs[0].conv
        for b in convs[1:]:
            c = b.conv
            same = op_name(c.node) == op_name(first.node)
            if not same or (c.stride, c.dilation, c.groups) != (first.stride, first.dilation, first.groups):
                return None, "convs differ in op, stride, dilation or groups"
            if b.weight.shape[:2] != convs[0].weight.shape[:2]:
                return None, "convs differ in channels"
        paddings = [b.conv.explicit_padding(graph) for b in convs]
        if any(p is None for p in paddings):
            return None, "asymmetric 'same' padding"
        # the largest kernel (and its padding) hosts the others
        host = max(range(len(convs)), key=lambda i: tuple(convs[i].weight.shape[2:]))
        kernel, padding = tuple(convs[host].weight.shape[2:]), paddings[host]
        if not self.options.pad_kernels and any(tuple(b.weight.shape[2:]) != kernel for b in convs):
            return None, "kernels of different sizes (pad_kernels is off)"
        out_ch, in_per_group = convs[0].weight.shape[:2]
        weight = torch.zeros((out_ch, in_per_group, *kernel), dtype=torch.float64)
        bias = None
        for b, p in zip(convs, paddings):
            size = tuple(b.weight.shape[2:])
            offsets = _offsets(kernel, padding, size, p, first.dilation)
            if offsets is None:
                return None, f"a {size} kernel with padding {p} does not align inside {kernel} with padding {padding}"
            weight[(slice(None), slice(None), *(slice(t, t + k) for t, k in zip(offsets, size)))] += b.weight
            bias = _add(bias, b.bias)
        identities = [b for b in branches if b.kind in ("identity", "batch_norm")]
        if identities:
            in_channels = x.meta["val"].shape[1]
            if out_ch != in_channels:
                return None, "identity branch but the convs change the channel count"
            centre = _offsets(kernel, padding, (1,) * len(kernel), (0,) * len(kernel), first.dilation)
            if centre is None:
                return None, f"identity branch but a {kernel} kernel with padding {padding} has no tap at the centre"
            # output channel o reads its own input channel o at index o % in_per_group of its group
            rows = torch.arange(out_ch)
            for b in identities:
                values = b.affine.scale if b.kind == "batch_norm" else torch.ones(out_ch, dtype=torch.float64)
                weight[(rows, rows % in_per_group, *centre)] += values
                if b.kind == "batch_norm":
                    bias = _add(bias, b.affine.shift)
        conv = convs[host].conv
        dtype = graph.constant(conv.weight).dtype
        return {"kind": "conv", "weight": weight, "bias": bias, "dtype": dtype, "like": conv.weight, "conv": conv,
                "padding": padding, "bias_dtype": graph.constant(conv.bias).dtype if conv.bias is not None else dtype,
                "describe": f"{op_name(conv.node)} {tuple(weight.shape)} padding {padding}"}, ""

    # -- the rewrite --------------------------------------------------------------------------------
    def _rewrite(self, graph: Graph, root: fx.Node, terms: list, rewrites: list) -> None:
        g = graph.gm.graph
        merged_terms = {b.node for _, branches, _ in rewrites for b in branches}
        rest = [t for t in terms if not (isinstance(t, fx.Node) and t in merged_terms)]
        # a term can appear twice (conv(x) + conv(x) with one conv node): erase it once
        old_nodes = list(dict.fromkeys(b.node for _, branches, _ in rewrites for b in branches if b.kind != "identity"))
        with derived_from(graph, old_nodes + [root]):
            new_terms = []
            for x, branches, plan in rewrites:
                like = plan["like"]
                weight = plan["weight"].to(plan["dtype"])
                weight = graph.add_constant(weight, f"{like.target}_merged", graph.fqns(like), before=like)
                bias = None
                if plan["bias"] is not None:
                    bias = plan["bias"].to(plan["bias_dtype"])
                    bias = graph.add_constant(bias, f"{like.target}_bias_merged", bias_fqns(graph, like), before=like)
                with g.inserting_before(root):
                    if plan["kind"] == "conv":
                        c = plan["conv"]
                        new = g.call_function(c.node.target, (x, weight, bias, c.stride, plan["padding"], c.dilation, c.groups))
                    else:
                        new = g.call_function(F.linear, (x, weight, bias))
                new_terms.append(new)
            with g.inserting_before(root):
                total = new_terms[0]
                for term in new_terms[1:] + rest:
                    total = g.call_function(operator.add, (total, term))
        root.replace_all_uses_with(total)
        # erase the old sum (root first: it uses the inner adds), then the merged branches
        for node in _sum_nodes(root):
            g.erase_node(node)
        for node in old_nodes:
            g.erase_node(node)


def _is_plain_add(node: fx.Node) -> bool:
    """``a + b`` of two tensors, no alpha, not in place."""
    return (
        node.op in ("call_function", "call_method") and op_name(node) == "add" and len(node.args) == 2
        and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    )


def _is_inner_add(node, parent: fx.Node) -> bool:
    """Whether ``node`` is a plain add read once, by ``parent`` only: part of ``parent``'s sum."""
    return (
        isinstance(node, fx.Node) and _is_plain_add(node) and len(node.users) == 1
        and _is_plain_add(parent) and parent in node.users and parent.args.count(node) == 1
    )


def _is_plain_add_of_tree(node: fx.Node) -> bool:
    """Whether ``node`` is an inner add of a larger sum (whose root handles it)."""
    return len(node.users) == 1 and _is_inner_add(node, next(iter(node.users)))


def _sum_terms(root: fx.Node) -> list:
    """The terms of ``root``, looking through inner adds that feed only this sum."""
    terms = []
    for arg in root.args:
        terms += _sum_terms(arg) if _is_inner_add(arg, root) else [arg]
    return terms


def _sum_nodes(root: fx.Node) -> list[fx.Node]:
    """The add nodes of the sum, root first."""
    nodes = [root]
    for arg in root.args:
        if _is_inner_add(arg, root):
            nodes += _sum_nodes(arg)
    return nodes


def _offsets(kernel, padding, small, small_padding, dilation) -> tuple[int, ...] | None:
    """Where a ``small`` kernel with ``small_padding`` sits inside ``kernel`` with ``padding`` so that
    both read the same inputs at every output position: t = (P - p) / dilation per dim."""
    offsets = []
    for k_big, p_big, k, p, d in zip(kernel, padding, small, small_padding, dilation):
        if (p_big - p) % d:
            return None
        t = (p_big - p) // d
        if t < 0 or t + k > k_big:
            return None
        offsets.append(t)
    return tuple(offsets)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _describe(graph: Graph, node: fx.Node) -> str:
    return graph.module_path(node) or node.name
