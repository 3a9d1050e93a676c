"""``fold_batchnorm``: fold an eval-mode BatchNorm into the conv or linear next to it.

In eval mode with constant running statistics a BatchNorm is a per-channel affine map of its
input (channels on dim 1):

    bn(x) = a * x + c,    a = gamma / sqrt(var + eps),    c = beta - mean * a

so it can be folded into a neighbouring conv (conv1d/conv2d) or linear, exactly up to rounding
(the new weights are computed in float64 and cast back to the original dtype):

- into the op right BEFORE it, the classic conv-BN fold: every output channel o of the op is
  scaled, ``W'[o] = a[o] W[o]``, ``b'[o] = a[o] (b[o] - mean[o]) + beta[o]``. Exact when the op's
  output has no user but the BatchNorm (else that user would see the folded values). A linear
  qualifies only with a 2-d output ([N, C]): BatchNorm's channels are dim 1, a linear's outputs
  the last dim.
- into the op(s) right AFTER it, when nothing before can absorb it (RepVGG, RePaViT's BatchNorm
  before an FFN): ``W' = W diag(a)``, ``b' = b + W c`` (for a conv, ``W c`` sums over input
  channels and kernel taps). Exact when every user of the BatchNorm is such an op. A conv only
  qualifies with zero padding: it pads ``bn(x)`` with zeros, while the folded conv would pad
  ``x`` with zeros, which is ``bn`` of something else at the border (those are skipped with a
  warning). A linear qualifies with a 2-d input, or on a 3-d input through a ``transpose(1, 2)``
  (BatchNorm1d over tokens: ``bn(x.transpose(1, 2)).transpose(1, 2)``); the transpose pair left
  around the removed BatchNorm is collapsed.

A BatchNorm in training mode, one whose statistics or affine parameters are not constants, or
one with no foldable neighbour is left alone and listed under ``skipped`` with the reason.
A BatchNorm on a branch's input that feeds a sum (RepVGG's identity branch) is left to
``merge_branches``, which turns it into an identity kernel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph, op_name
from lqc.ir.linear import LinearSite, linear_site
from lqc.ir.ops import is_inplace

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass

# -- BatchNorm as an affine map -------------------------------------------------------------------


@dataclass
class BatchNormAffine:
    """An eval-mode BatchNorm ``y = scale * x + shift`` over dim 1, in float64."""

    node: fx.Node
    x: fx.Node
    scale: torch.Tensor  # a [C]
    shift: torch.Tensor  # c [C]
    constants: list[fx.Node] = field(default_factory=list)


_F_BATCH_NORM = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_BATCH_NORM = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
_BATCH_NORM_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def batch_norm_args(node: fx.Node) -> dict[str, Any] | None:
    """The arguments of a batch_norm node by name, whichever of the two signatures it uses."""
    if node.op != "call_function" or op_name(node) != "batch_norm":
        return None
    # F.batch_norm takes (input, running_mean, running_var, weight, bias, ...); torch.batch_norm
    # and aten.batch_norm take (input, weight, bias, running_mean, running_var, ...).
    names = _F_BATCH_NORM if node.target is F.batch_norm else _ATEN_BATCH_NORM
    args = dict(_BATCH_NORM_DEFAULTS)
    args.update(zip(names, node.args))
    args.update(node.kwargs)
    return args if "input" in args and "running_mean" in args and "running_var" in args else None


def batch_norm_affine(graph: Graph, node: fx.Node) -> tuple[BatchNormAffine | None, str]:
    """(the affine map of an eval-mode BatchNorm, "") or (None, why it is not one)."""
    args = batch_norm_args(node)
    if args is None:
        return None, "not a batch_norm call"
    if args["training"] is not False:
        return None, "training mode (batch statistics)"
    x = args["input"]
    constants = [args[k] for k in ("running_mean", "running_var", "weight", "bias")]
    if not isinstance(x, fx.Node) or any(c is not None and not graph.is_constant(c) for c in constants):
        return None, "statistics or affine parameters are not constants"
    if constants[0] is None or constants[1] is None:
        return None, "no running statistics"
    val, out = x.meta.get("val"), node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(out, torch.Tensor) or val.dim() < 2:
        return None, "input shape unknown or not [N, C, ...]"
    if out.dtype != val.dtype or tuple(out.shape) != tuple(val.shape):
        return None, "output dtype or shape differs from the input's"
    mean, var, gamma, beta = (graph.constant(c).to(torch.float64) if c is not None else None for c in constants)
    channels = val.shape[1]
    if mean.shape != (channels,) or var.shape != (channels,):
        return None, "statistics are not one value per channel"
    gamma = gamma if gamma is not None else torch.ones_like(mean)
    beta = beta if beta is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + float(args["eps"]))
    shift = beta - mean * scale
    return BatchNormAffine(node, x, scale, shift, [c for c in constants if c is not None]), ""


# -- convs ----------------------------------------------------------------------------------------

_CONV_OPS = {"conv1d": 1, "conv2d": 2}
_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass
class ConvSite:
    """``convNd(x, W, b, stride, padding, dilation, groups)`` with a constant W (and b)."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # "same" / "valid" as given
    dilation: tuple[int, ...]
    groups: int

    def kernel(self, graph: Graph) -> tuple[int, ...]:
        return tuple(graph.constant(self.weight).shape[2:])

    def explicit_padding(self, graph: Graph) -> tuple[int, ...] | None:
        """Padding per spatial dim as integers; None for "same" padding that is not symmetric."""
        if not isinstance(self.padding, str):
            return self.padding
        if self.padding == "valid":
            return (0,) * len(self.stride)
        totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel(graph))]
        return tuple(t // 2 for t in totals) if all(t % 2 == 0 for t in totals) else None

    def pads_nothing(self, graph: Graph) -> bool:
        padding = self.explicit_padding(graph)
        return padding is not None and not any(padding)


def conv_site(node: fx.Node) -> ConvSite | None:
    name = op_name(node)
    if node.op != "call_function" or name not in _CONV_OPS:
        return None
    spatial = _CONV_OPS[name]
    args = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    args.update(zip(_CONV_PARAMS, node.args))
    args.update(node.kwargs)
    if set(args) != set(_CONV_PARAMS) or not isinstance(args["input"], fx.Node):
        return None
    if not _is_constant(args["weight"]) or (args["bias"] is not None and not _is_constant(args["bias"])):
        return None

    def per_dim(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial

    padding = args["padding"] if isinstance(args["padding"], str) else per_dim(args["padding"])
    return ConvSite(
        node, args["input"], args["weight"], args["bias"], per_dim(args["stride"]), padding,
        per_dim(args["dilation"]), int(args["groups"]),
    )


def set_conv_params(site: ConvSite, weight: fx.Node, bias: fx.Node | None) -> None:
    """Point the conv at new weight and bias constants (all arguments positional)."""
    site.node.args = (site.x, weight, bias, site.stride, site.padding, site.dilation, site.groups)
    site.node.kwargs = {}
    site.weight, site.bias = weight, bias


def _is_constant(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def bias_fqns(graph: Graph, weight: fx.Node) -> tuple[str, ...]:
    """Module paths for a bias created next to ``weight`` (an op that had none)."""
    return tuple(f.rsplit(".", 1)[0] + ".bias" for f in graph.fqns(weight))


def new_weight_and_bias(
    graph: Graph, weight_node: fx.Node, bias_node: fx.Node | None, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[fx.Node, fx.Node]:
    """New constants for an op's weight and bias (float64 ``bias`` cast to the old bias's dtype, or
    the weight's). New ones, never edited in place: the old constants may have other users."""
    new_w = graph.add_constant(weight, f"{weight_node.target}_bnfold", graph.fqns(weight_node), before=weight_node)
    if bias_node is not None:
        dtype = graph.constant(bias_node).dtype
        new_b = graph.add_constant(bias.to(dtype), f"{bias_node.target}_bnfold", graph.fqns(bias_node), before=bias_node)
    else:
        name = f"{weight_node.target}_bias_bnfold"
        new_b = graph.add_constant(bias.to(weight.dtype), name, bias_fqns(graph, weight_node), before=weight_node)
    return new_w, new_b


def _bias64(graph: Graph, bias: fx.Node | None, channels: int) -> torch.Tensor:
    return graph.constant(bias).to(torch.float64) if bias is not None else torch.zeros(channels, dtype=torch.float64)


# -- the pass -------------------------------------------------------------------------------------


@dataclass
class FoldBatchNormOptions(PassOptions):
    after: bool = field(
        default=True,
        metadata={"help": "also fold a BatchNorm into the conv/linear after it when none before can absorb it"},
    )


@dataclass
class FoldBatchNormReport:
    folded: list[dict]  # {"batch_norm", "where": "before" or "after", "into": the layers that absorbed it}
    skipped: list[dict]  # {"batch_norm", "reason"}


@register_pass
class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    description = "fold eval-mode BatchNorm into the conv/linear before it (or after it): W' = W * a, b' = (b - mean) a + beta"
    Options = FoldBatchNormOptions

    def run(self, graph: Graph, ctx) -> PassResult:
        folded, skipped = [], []
        for node in list(graph.nodes):
            if batch_norm_args(node) is None or not self.selects(node):
                continue
            name = _describe(graph, node)
            bn, reason = batch_norm_affine(graph, node)
            if bn is not None:
                into, reason = self._fold_before(graph, bn)
                where = "before"
                if into is None and self.options.after:
                    into, after_reason = self._fold_after(graph, bn)
                    reason, where = f"{reason}; {after_reason}", "after"
                if into is not None:
                    folded.append({"batch_norm": name, "where": where, "into": into})
                    continue
            skipped.append({"batch_norm": name, "reason": reason})
        return PassResult(matches=len(folded), details=FoldBatchNormReport(folded=folded, skipped=skipped))

    # -- into the producer ----------------------------------------------------------------------
    def _fold_before(self, graph: Graph, bn: BatchNormAffine) -> tuple[list[str] | None, str]:
        x = bn.x
        conv, linear = conv_site(x), linear_site(x)
        if conv is None and linear is None:
            return None, f"nothing to fold into before it ({op_name(x)})"
        if len(x.users) != 1:
            return None, f"{op_name(x)} before it has other users"
        if not self.selects(x):
            return None, f"{op_name(x)} before it is not selected"
        val = x.meta["val"]
        if conv is not None:
            self._scale_conv_outputs(graph, conv, bn)
        elif val.dim() != 2:
            return None, "linear before it: its channels are not BatchNorm's dim 1 (output not 2-d)"
        elif not self._scale_linear_outputs(graph, linear, bn):
            return None, "linear before it has no bias to absorb the shift (matmul)"
        bn.node.replace_all_uses_with(x)
        graph.gm.graph.erase_node(bn.node)
        return [_describe(graph, x)], ""

    def _scale_conv_outputs(self, graph: Graph, conv: ConvSite, bn: BatchNormAffine) -> None:
        w = graph.constant(conv.weight)
        view = (-1,) + (1,) * (w.dim() - 1)
        weight = (w.to(torch.float64) * bn.scale.view(view)).to(w.dtype)
        bias = _bias64(graph, conv.bias, w.shape[0]) * bn.scale + bn.shift
        set_conv_params(conv, *new_weight_and_bias(graph, conv.weight, conv.bias, weight, bias))

    def _scale_linear_outputs(self, graph: Graph, site: LinearSite, bn: BatchNormAffine) -> bool:
        if op_name(site.node) not in ("linear", "addmm"):
            return False
        w = graph.constant(site.weight)
        # the stored weight is [out, in] (linear) or [in, out] (addmm): scale its output axis
        scale = bn.scale[None, :] if site.transposed else bn.scale[:, None]
        weight = (w.to(torch.float64) * scale).to(w.dtype)
        bias = _bias64(graph, site.bias, len(bn.scale)) * bn.scale + bn.shift
        _set_linear_params(graph, site, weight, bias)
        return True

    # -- into the consumers -----------------------------------------------------------------------
    def _fold_after(self, graph: Graph, bn: BatchNormAffine) -> tuple[list[str] | None, str]:
        if any(is_inplace(user) and user.args and user.args[0] is bn.x for user in bn.x.users):
            # the consumers will read x itself, later than the BatchNorm did: a write in between would reach them
            return None, "its input is written in place"
        rank = bn.x.meta["val"].dim()
        plan: list[tuple[str, Any]] = []  # ("conv", ConvSite) / ("linear", LinearSite)
        transposes: list[fx.Node] = []
        for user in bn.node.users:
            if not self.selects(user) and op_name(user) not in ("transpose", "permute"):
                return None, f"{op_name(user)} after it is not selected"
            if (conv := conv_site(user)) is not None and conv.x is bn.node:
                if not conv.pads_nothing(graph):
                    warnings.warn(
                        f"fold_batchnorm: {_describe(graph, bn.node)} feeds {_describe(graph, user)}, which pads its "
                        f"input with zeros (padding {conv.padding}); folding would pad before the BatchNorm instead. Left alone.",
                        stacklevel=3,
                    )
                    return None, "conv after it pads its input (padding of the BatchNorm output is not foldable)"
                plan.append(("conv", conv))
            elif (site := linear_site(user)) is not None and site.x is bn.node and rank == 2:
                plan.append(("linear", site))
            elif _swaps_channels_last(user, bn.node, rank) and user.users:
                for consumer in user.users:
                    site = linear_site(consumer)
                    if site is None or site.x is not user or not self.selects(consumer):
                        return None, f"{op_name(consumer)} after its transpose is not a selected linear"
                    plan.append(("linear", site))
                transposes.append(user)
            else:
                return None, f"used by {op_name(user)}, which cannot absorb it"
        if not plan:
            return None, "no users"
        if any(kind == "linear" and op_name(site.node) not in ("linear", "addmm") for kind, site in plan):
            return None, "a linear after it has no bias to absorb the shift (matmul)"

        for kind, site in plan:
            if kind == "conv":
                self._absorb_conv_inputs(graph, site, bn)
            else:
                self._absorb_linear_inputs(graph, site, bn)
        bn.node.replace_all_uses_with(bn.x)
        graph.gm.graph.erase_node(bn.node)
        for t in transposes:  # bn(x.transpose(1, 2)).transpose(1, 2) is now x.transpose(1, 2).transpose(1, 2): x
            _collapse_transpose_pair(graph, t, rank)
        return [_describe(graph, site.node) for _, site in plan], ""

    def _absorb_conv_inputs(self, graph: Graph, conv: ConvSite, bn: BatchNormAffine) -> None:
        w = graph.constant(conv.weight)
        w64 = w.to(torch.float64)
        out_channels, in_per_group = w.shape[0], w.shape[1]
        # weight column j of output channel o reads input channel (o's group) * in_per_group + j
        group_of_out = torch.arange(out_channels) // (out_channels // conv.groups)
        channel = group_of_out[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
        spatial = (1,) * (w.dim() - 2)
        weight = (w64 * bn.scale[channel].view(out_channels, in_per_group, *spatial)).to(w.dtype)
        # with zero padding every tap reads a real input: the shift adds sum over taps of W c
        taps = w64.sum(dim=tuple(range(2, w.dim())))
        bias = _bias64(graph, conv.bias, out_channels) + (taps * bn.shift[channel]).sum(dim=1)
        set_conv_params(conv, *new_weight_and_bias(graph, conv.weight, conv.bias, weight, bias))

    def _absorb_linear_inputs(self, graph: Graph, site: LinearSite, bn: BatchNormAffine) -> None:
        w = site.weight_tensor(graph)  # [out, in]
        w64 = w.to(torch.float64)
        weight = w64 * bn.scale[None, :]
        bias = _bias64(graph, site.bias, w.shape[0]) + w64 @ bn.shift
        stored = weight.T.contiguous() if site.transposed else weight
        _set_linear_params(graph, site, stored.to(w.dtype), bias)


def _set_linear_params(graph: Graph, site: LinearSite, stored_weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Point a linear/addmm at new constants: ``stored_weight`` in the site's own orientation."""
    new_w, new_b = new_weight_and_bias(graph, site.weight, site.bias, stored_weight, bias)
    node = site.node
    if op_name(node) == "addmm":  # addmm(bias, x, W)
        node.args = (new_b, site.x, new_w)
    else:
        node.args = (site.x, new_w, new_b)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
    site.weight, site.bias = new_w, new_b


def _transpose_dims(node: fx.Node, rank: int) -> tuple[int, int] | None:
    """The two dims a ``transpose``/``permute`` node swaps (normalized), or None."""
    name = op_name(node)
    if name == "transpose" and len(node.args) == 3 and not node.kwargs:
        a, b = node.args[1], node.args[2]
        if isinstance(a, int) and isinstance(b, int):
            return tuple(sorted((a % rank, b % rank)))
    if name == "permute" and not node.kwargs:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        dims = [d % rank for d in dims] if all(isinstance(d, int) for d in dims) else None
        if dims is not None and len(dims) == rank:
            moved = [i for i, d in enumerate(dims) if d != i]
            if len(moved) == 2 and dims[moved[0]] == moved[1] and dims[moved[1]] == moved[0]:
                return tuple(moved)
    return None


def _swaps_channels_last(node: fx.Node, source: fx.Node, rank: int) -> bool:
    """``source.transpose(1, 2)`` of a 3-d tensor: BatchNorm's channels become a linear's features."""
    return rank == 3 and node.args and node.args[0] is source and _transpose_dims(node, rank) == (1, 2)


def _collapse_transpose_pair(graph: Graph, outer: fx.Node, rank: int) -> None:
    inner = outer.args[0]
    if isinstance(inner, fx.Node) and _swaps_channels_last(outer, inner, rank) and _transpose_dims(inner, rank) == (1, 2):
        outer.replace_all_uses_with(inner.args[0])
        graph.gm.graph.erase_node(outer)
        if not inner.users:
            graph.gm.graph.erase_node(inner)


def _describe(graph: Graph, node: fx.Node) -> str:
    return graph.module_path(node) or node.name
