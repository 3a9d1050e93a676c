"""PEFT-style adapter wrappers for tests, without depending on peft.

Each wrapper reproduces the inference forward of a PEFT tuner layer (peft 0.17/0.18, as in
huggingface/peft ``src/peft/tuners/...``), with the same module and parameter names, so a traced
model has the graph a ``get_peft_model`` model has:

- ``LoraLinear``: ``lora.layer.Linear.forward`` for a plain LoRA adapter:
  ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``, scaling = lora_alpha / r.
- ``DoraLinear``: the same with ``use_dora=True``: ``lora.variants.DoraLinearVariant.forward`` and
  ``lora.dora.DoraLinearLayer.forward`` (the eval path that reuses the base result: the bias is
  subtracted, the rest rescaled by ``magnitude / ||W + scaling * B A||`` row-wise, the norm
  detached, the LoRA weight obtained by running ``lora_B(lora_A(eye))``).
- ``BoneLinear``: ``bone.layer.BoneLinear.forward``, default "bone" variant (the input summed
  over blocks of r channels, zero-padded to a multiple of r, times ``bone_block`` [r, out]) and
  the "bat" variant (the weight rebuilt in the forward from its [r, r] blocks and
  ``bone_block`` [out/r, r, r], then one ``F.linear``).

Adapter weights are random and non-zero (PEFT initialises lora_B and bone_block to zero, which
would make every merge trivially exact).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER = "default"  # PEFT's default adapter name, the key of every per-adapter ModuleDict


def _features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear, or of a transformers Conv1D (GPT-2), whose weight is [in, out]."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return tuple(layer.weight.shape)


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = _features(base_layer)
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(r, out_features, bias=False)})
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.scaling = {ADAPTER: lora_alpha / r}
        with torch.no_grad():
            self.lora_A[ADAPTER].weight.copy_(torch.randn(r, in_features, generator=generator) / in_features**0.5)
            self.lora_B[ADAPTER].weight.copy_(torch.randn(out_features, r, generator=generator) / r**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        result_dtype = result.dtype
        lora_A, lora_B = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        dropout, scaling = self.lora_dropout[ADAPTER], self.scaling[ADAPTER]
        x = x.to(lora_A.weight.dtype)  # PEFT's _cast_input_dtype
        result = result + self._adapter(x, result, lora_A, lora_B, dropout, scaling)
        return result.to(result_dtype)

    def _adapter(self, x, result, lora_A, lora_B, dropout, scaling):
        return lora_B(lora_A(dropout(x))) * scaling


class DoraMagnitude(nn.Module):
    """PEFT's DoraLinearLayer: holds the magnitude vector (its ``weight``) and computes the DoRA term."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    @staticmethod
    def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
        # L2 norm of each output row of W + scaling * B A (over the input dimension)
        weight = weight + scaling * lora_weight
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None):
        x_eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=x.dtype)
        lora_weight = lora_B(lora_A(x_eye)).T
        weight = base_layer.weight.to(x.dtype)
        weight_norm = self.weight_norm(weight, lora_weight.detach(), scaling).detach()
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is not None:
            if base_layer.bias is not None:
                base_result = base_result - base_layer.bias
        else:
            base_result = F.linear(x, weight)
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


class DoraLinear(LoraLinear):
    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, dropout: float, generator: torch.Generator):
        super().__init__(base_layer, r, lora_alpha, dropout, generator)
        assert isinstance(base_layer, nn.Linear), "this DoRA mirrors PEFT's nn.Linear path (fan_in_fan_out=False)"
        with torch.no_grad():
            # PEFT initialises the magnitude to ||W + s B A|| (the layer starts out as plain LoRA);
            # a trained magnitude differs from it, so it is perturbed here.
            lora_weight = self.lora_B[ADAPTER].weight @ self.lora_A[ADAPTER].weight
            norm = DoraMagnitude.weight_norm(base_layer.weight, lora_weight, self.scaling[ADAPTER])
            magnitude = norm * (1 + 0.5 * torch.rand(norm.shape, generator=generator))
        self.lora_magnitude_vector = nn.ModuleDict({ADAPTER: DoraMagnitude(magnitude)})

    def _adapter(self, x, result, lora_A, lora_B, dropout, scaling):
        # DoraLinearVariant.forward: in eval (or with no dropout) the base result is reused.
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result
        else:
            x = dropout(x)
            base_result = None
        return self.lora_magnitude_vector[ADAPTER](
            x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=self.base_layer, base_result=base_result
        )


class BoneLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int, variant: str, generator: torch.Generator):
        super().__init__()
        assert variant in ("bone", "bat")
        self.base_layer = base_layer
        self.bone_fn = variant
        out_features, in_features = base_layer.weight.shape
        if variant == "bat":
            assert in_features % r == 0 and out_features % r == 0, "bat needs [r, r] blocks"
            block = torch.randn(out_features // r, r, r, generator=generator) * 0.1
        else:
            block = torch.randn(r, out_features, generator=generator) * 0.05
        self.bone_block = nn.ParameterDict({ADAPTER: nn.Parameter(block)})

    def _bat_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # BoneLinear.get_delta_weight: every [r, r] block W_ij of W becomes W_ij @ b_i + b_i, with
        # b_i the block of bone_block for output block i; the result is added to W.
        bone = self.bone_block[ADAPTER]
        r = bone.size(-1)
        out_features, in_features = weight.shape
        blocks = weight.reshape(out_features // r, r, in_features // r, r).permute(2, 0, 1, 3)
        delta = (blocks @ bone + bone).permute(1, 2, 0, 3).reshape(out_features, in_features)
        return weight + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.bone_fn == "bat":
            weight = self._bat_weight(self.base_layer.weight.clone())
            result = F.linear(x.to(weight.dtype), weight, self.base_layer.bias)
        else:
            result = self.base_layer(x)
            bone = self.bone_block[ADAPTER]
            r = bone.size(0)
            if x.size(-1) % r != 0:
                x = F.pad(x, (0, (r - x.size(-1) % r) % r))
            x = x.to(bone.dtype)
            result = result + torch.sum(x.reshape(*x.shape[:-1], x.size(-1) // r, r), dim=-2) @ bone
        return result.to(previous_dtype)


def wrap(model: nn.Module, plan: dict[str, tuple], seed: int = 0) -> nn.Module:
    """Replace the linears whose path matches a regex of ``plan`` by an adapter wrapper.

    ``plan``: regex -> ("lora", r, alpha[, dropout]) | ("dora", r, alpha[, dropout]) |
    ("bone", r) | ("bat", r); LoRA also wraps GPT-2's Conv1D. The first matching regex wins.
    Modifies ``model`` in place and returns it (in eval mode).
    """
    generator = torch.Generator().manual_seed(seed)
    from transformers.pytorch_utils import Conv1D

    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    for name, linear in targets:
        spec = next((spec for pattern, spec in plan.items() if re.search(pattern, name)), None)
        if spec is None:
            continue
        kind = spec[0]
        assert kind == "lora" or isinstance(linear, nn.Linear), f"{kind} is wrapped around nn.Linear only"
        if kind in ("lora", "dora"):
            r, alpha, *rest = spec[1:]
            cls = LoraLinear if kind == "lora" else DoraLinear
            wrapper = cls(linear, r, alpha, rest[0] if rest else 0.1, generator)
        else:
            wrapper = BoneLinear(linear, spec[1], kind, generator)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper.to(linear.weight.dtype))
    return model.eval()


# One adapter of each kind on a different linear of the 2-layer tiny Llama (hidden 64, kv 32,
# intermediate 160): LoRA (dropout 0.1, eval), DoRA, Bone with padding (64 % 6 != 0) and without,
# and Bone's bat variant.
MIXED_PLAN = {
    r"layers\.0\.self_attn\.q_proj": ("lora", 4, 8),
    r"layers\.0\.self_attn\.k_proj": ("dora", 4, 8),
    r"layers\.0\.mlp\.up_proj": ("bone", 6),
    r"layers\.1\.self_attn\.o_proj": ("bone", 8),
    r"layers\.1\.mlp\.gate_proj": ("bat", 8),
    r"layers\.1\.self_attn\.v_proj": ("lora", 8, 16),
    r"layers\.1\.mlp\.down_proj": ("dora", 8, 4),
}
ADAPTER_NAMES = ("lora_A", "lora_B", "lora_magnitude_vector", "bone_block")


def adapter_constants(graph) -> list[str]:
    """Module paths of the graph's constants that belong to an adapter."""
    return [fqn for name, _ in graph.constants() for fqn in graph.fqns(name) if any(a in fqn for a in ADAPTER_NAMES)]
