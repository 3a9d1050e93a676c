"""The flash-decoding kernel over a compressed KV cache against ``attend`` (lqc.runtime.kv.attention),
under TRITON_INTERPRET=1: 8/4/2-bit blocks with sinks and recent tokens, GQA, one and several
query tokens, boolean / additive / no mask, token chunks merged across programs, fp32 (<= 1e-3
relative) and bf16 (<= 1e-2)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lqc.codegen import kv_decode  # noqa: E402
from lqc.runtime.kv.attention import CompressedKVView, attend  # noqa: E402
from lqc.runtime.kv.quant import quantize_keys, quantize_values  # noqa: E402

if not kv_decode.interpreted() and not torch.cuda.is_available():
    raise RuntimeError("lqc.codegen.kv_decode was imported before TRITON_INTERPRET=1 was set and there is no GPU")


def _view(b, kv_heads, d, sinks, quantized, recent, bits, group, dtype, gen):
    def tensor(t):
        return torch.randn(b, kv_heads, t, d, generator=gen).to(dtype)

    q = None
    if quantized:
        q = (quantize_keys(torch.randn(b, kv_heads, quantized, d, generator=gen) * 2, bits, group),
             quantize_values(torch.randn(b, kv_heads, quantized, d, generator=gen), bits, group))
    return CompressedKVView(tensor(sinks), tensor(sinks), q, tensor(recent), tensor(recent), None)


CASES = [
    # d, sinks, quantized, recent, q_len, bits, group, mask
    (16, 0, 32, 1, 1, 8, 16, None),
    (32, 4, 64, 7, 1, 4, 32, "bool"),
    (16, 4, 96, 5, 5, 2, 16, None),
    (32, 0, 0, 9, 3, 4, 32, "additive"),
    (64, 2, 128, 3, 1, 4, 64, "bool"),
    (16, 4, 48, 6, 4, 8, 16, "additive"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"d{c[0]}-q{c[2]}-b{c[5]}-{c[7]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_decoding_matches_attend(case, dtype):
    d, sinks, quantized, recent, q_len, bits, group, mask = case
    gen = torch.Generator().manual_seed(d + quantized + recent)
    b, kv_heads, rep = 2, 2, 3
    view = _view(b, kv_heads, d, sinks, quantized, recent, bits, group, dtype, gen)
    query = torch.randn(b, kv_heads * rep, q_len, d, generator=gen).to(dtype)
    tokens = view.tokens
    attention_mask = None
    if mask is not None:
        allowed = torch.rand(b, 1, q_len, tokens + 3, generator=gen) > 0.3  # 3 unused trailing positions
        allowed[0, 0, 0] = False  # a query row allowed nothing: zeros
        attention_mask = allowed if mask == "bool" else torch.where(allowed, torch.randn(allowed.shape, generator=gen), float("-inf"))
    out, _ = kv_decode.attend_triton(view, query, attention_mask, d**-0.5, tokens_per_program=32)
    expected, _ = attend(view, query, attention_mask, d**-0.5)
    assert out.dtype == dtype and out.shape == expected.shape == (b, q_len, kv_heads * rep, d)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() <= tolerance
    if mask is not None:
        assert out[0, 0, :rep].abs().max().item() == 0  # the row allowed nothing (query heads of KV head 0)


def test_steps_it_does_not_compute_go_to_attend():
    gen = torch.Generator().manual_seed(0)
    view = _view(1, 1, 24, 0, 0, 4, 8, 8, torch.float32, gen)
    assert "head_dim 24" in kv_decode.supported(view, torch.randn(1, 1, 1, 24), 0)
    assert "SnapKV" in kv_decode.supported(view, torch.randn(1, 1, 1, 24), 4)
    assert "soft-capped" in kv_decode.supported(view, torch.randn(1, 1, 1, 32), 0, softcap=50.0)
    query = torch.randn(1, 1, 1, 24, generator=gen)
    out, _ = kv_decode.attend_triton(view, query, None, 0.2)
    torch.testing.assert_close(out, attend(view, query, None, 0.2)[0])


@pytest.mark.parametrize("mask", [None, "bool"])
def test_evicted_tokens_per_kv_head_and_a_sliding_window_offset(mask):
    """Stored tokens at positions that differ per KV head (eviction) and a mask that starts at
    position 20 (a sliding window's): the kernel's bias rows follow each KV head's positions, and
    the tokens before the window are masked out, as in ``attend``."""
    gen = torch.Generator().manual_seed(7)
    b, kv_heads, rep, d, q_len = 1, 2, 3, 16, 2
    view = _view(b, kv_heads, d, 2, 32, 6, 4, 16, torch.float32, gen)
    tokens = view.tokens  # 40 stored of 48 seen: per KV head, a different 8 were evicted
    view.positions = torch.stack([torch.randperm(48, generator=gen)[:tokens].sort().values for _ in range(kv_heads)])[None]
    view.mask_offset = 20
    attention_mask = None if mask is None else torch.rand(b, 1, q_len, 48 - 20, generator=gen) > 0.2
    query = torch.randn(b, kv_heads * rep, q_len, d, generator=gen)
    out, _ = kv_decode.attend_triton(view, query, attention_mask, d**-0.5, causal=False, tokens_per_program=32)
    expected, _ = attend(view, query, attention_mask, d**-0.5, causal=False)
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-3
    # ``attend`` itself against softmax attention over the dequantized tokens, each KV head's
    # columns taken at its tokens' positions minus 20, the tokens before 20 left out
    keys, values = view.dequantized()
    columns = view.positions[0] - 20  # [Hkv, T]
    allowed = (columns >= 0)[:, None].expand(kv_heads, q_len, tokens)
    if attention_mask is not None:
        allowed = allowed & attention_mask[0, 0].T[columns.clamp(min=0)].transpose(1, 2)
    scores = (query[0].reshape(kv_heads, rep, q_len, d) * d**-0.5) @ keys[0][:, None].transpose(-1, -2)
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    reference = (probs @ values[0][:, None]).reshape(kv_heads * rep, q_len, d).transpose(0, 1)
    torch.testing.assert_close(expected[0], reference, atol=1e-5, rtol=1e-5)
