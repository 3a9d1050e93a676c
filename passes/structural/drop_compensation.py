"""Closed-form stand-ins for dropped sublayers, fitted on calibration activations.

A dropped unit (an attention or FFN sublayer, or one or more whole blocks) wrote ``y`` into the
residual stream: ``h_out = h_in + y``. Dropping it outright keeps ``h_out = h_in``; a
compensation keeps ``h_out = h_in + c(x)`` with ``c`` fitted in closed form on calibration
tokens, ``x`` being the stream ``h_in`` itself or the unit's own normed input ``norm(h_in)``:

- ``bias``: ``c(x) = mean(y)``, the unit's mean output (FLAP, An et al. 2024);
- ``diagonal``: ``c(x) = d * x + b``, one ridge regression per channel;
- ``linear``: ``c(x) = W x + b``, a ridge regression of ``y`` on ``x`` (LLM-Streamline, Chen et al.
  2024, fits such a map by least squares); with ``rank`` r the map is the best rank-r one for the
  fitted outputs (reduced-rank regression: ``W`` projected on the top r principal directions of
  ``W x`` over the calibration tokens), stored as two linears of r channels.

The ridge term is relative: ``ridge * trace(Cov(x)) / d`` is added to the diagonal of ``Cov(x)``.
Statistics are summed in float64 over every calibration token, so the fit is exactly the
least-squares solution on those tokens (``tests/test_drop_layers.py`` checks it against
``torch.linalg.lstsq``).

In the graph a compensation is ordinary ops on the stream: ``add(h_in, bias)`` or
``add(h_in, matmul(x, W.t()) + b)`` (low rank: two matmuls), with constants named after the
dropped module (``model.layers.3.self_attn.compensation.weight``): codegen, the viz and
save/load handle them like any other ops and constants. They are matmuls rather than linears so
that ``quantize`` leaves them in float: a quantized stand-in would be saved as a quantized layer
inside a module ``lqc.load`` replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph

KINDS = ("none", "bias", "diagonal", "linear")


@dataclass
class Compensation:
    """``c(x) = up(down(x)) + bias`` where present: ``down`` [r, d_in] and ``up`` [d_out, r] for a low
    rank map, ``up`` alone [d_out, d_in] for a full (or diagonal, stored full) one, neither for a bias."""

    bias: torch.Tensor
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    diagonal: torch.Tensor | None = None  # [d]: c(x) = diagonal * x + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.diagonal is not None:
            return x * self.diagonal.to(x.dtype) + self.bias.to(x.dtype)
        if self.up is None:
            return self.bias.to(x.dtype).expand(x.shape)
        if self.down is not None:
            x = F.linear(x, self.down.to(x.dtype))
        return F.linear(x, self.up.to(x.dtype), self.bias.to(x.dtype))

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in (self.bias, self.up, self.down, self.diagonal) if t is not None)


class Statistics:
    """Sums over calibration tokens of x, y, x x^T and x y^T (float64), what every fit needs."""

    def __init__(self, kind: str):
        self.kind = kind
        self.count = 0
        self.sx = self.sy = self.sxx = self.sxy = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        y = y.reshape(-1, y.shape[-1]).to(torch.float64)
        if self.sy is None:
            self.sx, self.sy = torch.zeros(x.shape[-1], dtype=torch.float64), torch.zeros(y.shape[-1], dtype=torch.float64)
        self.count += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        if self.kind == "diagonal":
            self.sxx = (x * x).sum(0) + (0 if self.sxx is None else self.sxx)
            self.sxy = (x * y).sum(0) + (0 if self.sxy is None else self.sxy)
        elif self.kind == "linear":
            self.sxx = x.T @ x + (0 if self.sxx is None else self.sxx)
            self.sxy = x.T @ y + (0 if self.sxy is None else self.sxy)

    def fit(self, ridge: float, rank: int = 0) -> Compensation:
        n = max(self.count, 1)
        mx, my = self.sx / n, self.sy / n
        if self.kind == "bias":
            return Compensation(bias=my.float())
        if self.kind == "diagonal":
            var = self.sxx / n - mx * mx
            cov = self.sxy / n - mx * my
            d = cov / (var + ridge * var.mean())
            return Compensation(bias=(my - d * mx).float(), diagonal=d.float())
        cxx = self.sxx / n - torch.outer(mx, mx)
        cxy = self.sxy / n - torch.outer(mx, my)
        lam = ridge * torch.trace(cxx) / cxx.shape[0]
        m = torch.linalg.solve(cxx + lam * torch.eye(cxx.shape[0], dtype=cxx.dtype), cxy)  # x @ m predicts y
        bias = my - mx @ m
        if not rank or rank >= min(m.shape):
            return Compensation(bias=bias.float(), up=m.T.float().contiguous())
        # reduced-rank regression: keep the top principal directions of the fitted outputs x @ m
        _, vectors = torch.linalg.eigh(m.T @ cxx @ m)
        v = vectors[:, -rank:]  # [d_out, r]
        bias = my - mx @ m @ v @ v.T  # the projected map's outputs keep the mean of y
        return Compensation(bias=bias.float(), up=v.float().contiguous(), down=(m @ v).T.float().contiguous())


def fit(kind: str, x: torch.Tensor, y: torch.Tensor, ridge: float, rank: int = 0) -> Compensation:
    """Fit a compensation of ``kind`` mapping the rows of ``x`` [..., d] to those of ``y`` in one go."""
    stats = Statistics(kind)
    stats.add(x, y)
    return stats.fit(ridge, rank)


def insert_compensation(graph: Graph, add: fx.Node, stream: fx.Node, source: fx.Node, compensation: Compensation, module: str) -> fx.Node:
    """Before the residual ``add`` of a dropped unit, the nodes of ``stream + c(source)``; returns the
    new stream value (the caller points the add's users at it). Constants are named ``{module}.compensation.*``."""
    g = graph.gm.graph
    name = f"{module}.compensation"

    def constant(tensor: torch.Tensor, part: str) -> fx.Node:
        return graph.add_constant(tensor.detach().clone(), f"{name}.{part}", (f"{name}.{part}",), before=add)

    stack = _module_stack(add, module)
    with g.inserting_before(add):
        bias = constant(compensation.bias, "bias")
        if compensation.diagonal is not None:
            scaled = g.call_function(torch.mul, (source, constant(compensation.diagonal, "scale")))
            _meta(scaled, add, stack)
            value = g.call_function(torch.add, (scaled, bias))
        elif compensation.up is None:
            value = bias
        else:
            # matmul with the transposed weight, not a linear: quantize leaves the stand-in in float
            # (it is small, and lqc.save stores it beside the dropped module, where load expects it)
            x = source
            if compensation.down is not None:
                x = g.call_function(torch.matmul, (source, g.call_function(torch.t, (constant(compensation.down, "down.weight"),))))
                _meta(x, add, stack, channels=compensation.down.shape[0])
            part = "up.weight" if compensation.down is not None else "weight"
            product = g.call_function(torch.matmul, (x, g.call_function(torch.t, (constant(compensation.up, part),))))
            _meta(product, add, stack)
            value = g.call_function(torch.add, (product, bias))
        if value is not bias:
            _meta(value, add, stack)
        out = g.call_function(add.target, (stream, value))
        _meta(out, add, dict(add.meta.get("nn_module_stack") or {}))
    return out


def _module_stack(add: fx.Node, module: str) -> dict:
    """The add's module stack, extended by ``module`` (the dropped sublayer), so the viz and the
    regions put the compensation where the sublayer was."""
    stack = dict(add.meta.get("nn_module_stack") or {})
    stack[f"lqc_compensation_{module}"] = (module, torch.nn.Module)
    return stack


def _meta(node: fx.Node, like: fx.Node, stack: dict, channels: int | None = None) -> None:
    node.meta["nn_module_stack"] = stack
    val = like.meta.get("val")
    if isinstance(val, torch.Tensor):
        if channels is not None:
            val = val.new_empty((*val.shape[:-1], channels))
        node.meta["val"] = val
