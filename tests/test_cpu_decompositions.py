"""codegen/cpu_decompositions.py: decode attention as Inductor reductions, against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lqc.codegen.cpu_decompositions import DECODE_QUERY_ROWS, _decode_attention


def _qkv(rows, slots, heads=6, kv_heads=2, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, rows, dim, generator=g).to(dtype)
    k, v = (torch.randn(1, kv_heads, slots, dim, generator=g).to(dtype) for _ in range(2))
    # transformers' repeat_kv: the kv heads broadcast to the query heads
    repeat = lambda t: t[:, :, None].expand(1, kv_heads, heads // kv_heads, slots, dim).reshape(1, heads, slots, dim)  # noqa: E731
    return q, repeat(k), repeat(v)


@pytest.mark.parametrize("rows", [1, 3, DECODE_QUERY_ROWS])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(rows, mask_kind, dtype):
    slots = 37
    q, k, v = _qkv(rows, slots, dtype=dtype)
    filled = torch.arange(slots) < 30  # a static cache: slots past the filled ones masked
    mask = None
    if mask_kind == "bool":
        mask = filled.expand(1, 1, rows, slots)
    elif mask_kind == "additive":
        mask = torch.where(filled, 0.0, float("-inf")).to(dtype).expand(1, 1, rows, slots)
    out, logsumexp = _decode_attention(q, k, v, attn_mask=mask, scale=0.3)
    ref_mask = mask.float() if mask is not None and mask.dtype != torch.bool else mask
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=ref_mask, scale=0.3)
    assert out.dtype == dtype and out.shape == q.shape and logsumexp.shape == q.shape[:-1]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_other_shapes_keep_the_flash_kernel():
    q, k, v = _qkv(DECODE_QUERY_ROWS + 1, 40)
    assert _decode_attention(q, k, v) is NotImplemented  # prefill-shaped
    q, k, v = _qkv(1, 40)
    assert _decode_attention(q, k, v, is_causal=True) is NotImplemented


@torch.no_grad()
def test_compiled_decode_matches_eager(tiny_llama):
    """A static-cache prefill and decode steps through lqc at target inductor (decode attention and
    the int4_vnni qlinear decomposed) against the same recipe at target eager."""
    from transformers import StaticCache

    import lqc
    from lqc.runtime.quantization.int4_int8_cpu import load_kernel

    model = tiny_llama.to(torch.bfloat16)
    activations = "int8" if load_kernel() is None else "bf16"
    recipe = [{"pass": "quantize", "format": "int4", "group_size": 32, "include_lm_head": True, "activations": activations}]
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    logits = {}
    for target in ("eager", "inductor"):
        torch._dynamo.reset()
        forward = torch.compile(model.forward, backend=lqc.Session({"recipe": recipe, "target": target, "progress": False}),
                                dynamic=False)
        cache = StaticCache(config=model.config, max_cache_len=16)
        steps = [forward(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]]
        for i in range(3):
            token = steps[-1].argmax(-1, keepdim=True)
            steps.append(forward(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([[9 + i]])).logits[:, -1])
        logits[target] = torch.stack(steps).float()
    ref = logits["eager"]
    assert ((logits["inductor"] - ref).norm() / ref.norm()).item() < 2e-2  # bf16 model: fusion rounds differently
