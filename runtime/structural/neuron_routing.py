"""``lqc::keep_top_neurons``: per token, an FFN's k most active neurons by the gate (schema and
semantics: lqc.ir.lqc_ops).

The score of neuron i on a token is ``|gate_i| * neuron_weight_i``: how strongly the gate opens
it, scaled by what the neuron usually contributes (lqc.passes.structural.route_neurons). The k
best keep their value in ``hidden`` and the rest become 0, so the down projection that follows
reads only their columns' contribution.

``keep_top_neurons_reference`` is the plain definition (a stable descending sort, the first k,
scatter of the kept values), the tests' reference. ``keep_top_neurons`` computes the same mask from a threshold: the k-th best
score per token, then one comparison and one multiply, which Inductor fuses with the FFN's
elementwise product. Ties at the threshold go to the lower index in both (torch.topk
leaves the order of ties unspecified), so both return the same tensor.
"""

from __future__ import annotations

import torch

from lqc.ir.lqc_ops import check_keep_top_neurons_shapes


def keep_top_neurons_reference(hidden: torch.Tensor, gate: torch.Tensor, neuron_weight: torch.Tensor, k: int) -> torch.Tensor:
    check_keep_top_neurons_shapes(hidden.shape, gate.shape, neuron_weight.shape, k)
    score = gate.abs().to(torch.float32) * neuron_weight.to(torch.float32)
    picked = score.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(hidden).scatter_(-1, picked, hidden.gather(-1, picked))


def keep_top_neurons(hidden: torch.Tensor, gate: torch.Tensor, neuron_weight: torch.Tensor, k: int) -> torch.Tensor:
    score = gate.abs().to(torch.float32) * neuron_weight.to(torch.float32)
    if k == score.shape[-1]:
        return hidden.clone()
    threshold = score.topk(k, dim=-1).values[..., -1:]
    above = score > threshold
    # neurons exactly at the threshold: keep the lowest-index ones until k are kept
    at = score == threshold
    room = k - above.sum(dim=-1, keepdim=True)
    keep = above | (at & (at.cumsum(dim=-1) <= room))
    return hidden * keep.to(hidden.dtype)


# registered after the definition: the tests call keep_top_neurons directly
torch.library.impl("lqc::keep_top_neurons", "CompositeExplicitAutograd")(keep_top_neurons)


class RoutedGatedMLP(torch.nn.Module):
    """A loaded gated MLP (``down(act(gate(x)) * up(x))``, the Llama family's) routed as the
    route_neurons pass left it: its own projections (float or QLinear), the pass's per-neuron
    weights and, when fitted, the skipped neurons' bias. lqc.load puts it where the MLP was; the
    state dict keeps the MLP's names (``{mlp}.gate_proj.weight``) plus ``{mlp}.neuron_weight``
    and ``{mlp}.skipped_bias``."""

    def __init__(self, mlp: torch.nn.Module, k: int, bias: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.k = k
        self.register_buffer("neuron_weight", torch.zeros(mlp.gate_proj.out_features))
        self.register_buffer("skipped_bias", torch.zeros(mlp.down_proj.out_features) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.act_fn(self.gate_proj(x))
        hidden = torch.ops.lqc.keep_top_neurons(gate * self.up_proj(x), gate, self.neuron_weight, self.k)
        out = self.down_proj(hidden)
        return out if self.skipped_bias is None else out + self.skipped_bias

