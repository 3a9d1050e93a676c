"""The lowrank pass (EoRA error compensation): the factors equal a direct whitened least-squares
reference; the stored factors (int8, bf16) stay close to them; lqc::qlinear adds exactly
``(x @ A.T) @ B.T * scale``; on a tiny Llama the compensated graph is closer to the float model than
plain int4 on calibration-like inputs, with the error it reports; bad options and scale-migrated
layers are named."""

from __future__ import annotations

import pytest
import torch

from lqc.ir import LqcConfigError, op_name, trace
from lqc.ir.lqc_ops import has_lowrank, qlinear_args
from lqc.passes import Calibration, PassContext, PassManager
from lqc.runtime.quantization.formats import quantize_int4
from lqc.runtime.quantization.lowrank import eora_factors, lowrank_residual, store_factors
from lqc.runtime.quantization.qlinear import qlinear_reference


def _activations(rows: int, width: int, seed: int) -> torch.Tensor:
    """Anisotropic inputs, as a language model's are: a few directions carry most of the energy."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g, dtype=torch.float64) * torch.logspace(0, -2, width, dtype=torch.float64)
    return torch.randn(rows, width, generator=g, dtype=torch.float64) @ mixing


def test_eora_equals_the_whitened_least_squares_reference():
    n, k, r = 24, 40, 5
    x = _activations(600, k, 0)
    hessian = x.T @ x / len(x)
    delta = torch.randn(n, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b, a = eora_factors(delta, hessian, r)
    # reference: the best rank-r M for || X (dW - M)^T ||_F is the truncated SVD in X's whitened basis
    chol = torch.linalg.cholesky(hessian)
    u, s, vh = torch.linalg.svd(delta @ chol)
    best = (u[:, :r] * s[:r]) @ vh[:r] @ torch.linalg.inv(chol)
    assert torch.allclose(b.double() @ a.double(), best, atol=1e-5 * best.abs().max())
    error = lambda m: float(((x @ (delta - m).T) ** 2).sum())  # noqa: E731
    plain_svd = torch.linalg.svd(delta)
    unweighted = (plain_svd.U[:, :r] * plain_svd.S[:r]) @ plain_svd.Vh[:r]
    assert error(b.double() @ a.double()) < 0.9 * error(unweighted)  # the activations' eigenspace is what pays


@pytest.mark.parametrize("storage,tolerance", [("int8", 0.02), ("bf16", 0.01)])
def test_stored_factors_stay_close_and_qlinear_adds_them(storage, tolerance):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 64, generator=g)
    q = quantize_int4(weight, 32)
    x = _activations(256, 64, 3).float()
    b, a = eora_factors(weight - q.dequantize(), x.T.double() @ x.double() / len(x), 8)
    factors = store_factors(b, a, storage)
    assert (factors.product() - b @ a).norm() <= tolerance * (b @ a).norm()
    args = (q.qweight, q.scales, q.zeros, None, "int4", 32, 64, 48)
    expected = qlinear_reference(x, *args) + lowrank_residual(x, factors.a, factors.b, factors.scale)
    got = torch.ops.lqc.qlinear(x, *args, factors.a, factors.b, factors.scale)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(lowrank_residual(x, factors.a, factors.b, factors.scale), x @ factors.product().T, atol=1e-4)


@pytest.fixture
def calibration():
    return Calibration([torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(3))])


def _logit_error(graph, reference, ids) -> float:
    out = lambda g: g.gm(ids)[0] if isinstance(g.gm(ids), (list, tuple)) else g.gm(ids)  # noqa: E731
    return float((out(graph) - out(reference)).pow(2).mean())


def test_compensated_tiny_llama_is_closer_to_float(tiny_llama, calibration):
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    reference = trace(tiny_llama, ids)
    quantize = {"pass": "quantize", "format": "int4", "group_size": 32, "kernels": False}
    plain = trace(tiny_llama, ids)
    PassManager([quantize]).run(plain, PassContext(calibration=calibration, progress=False))
    graph = trace(tiny_llama, ids)
    report = PassManager([quantize, {"pass": "lowrank", "rank": 8, "calibration_tokens": 1024}], verify=True).run(
        graph, PassContext(calibration=calibration, progress=False))
    qlinears = [n for n in graph.nodes if op_name(n) == "lqc::qlinear"]
    assert qlinears and all(has_lowrank(n) for n in qlinears)
    details = report.records[-1].details
    assert len(details.layers) == len(qlinears) and all(r["error_after"] < 0.8 * r["error_before"] for r in details.layers)
    assert details.factor_bytes == sum(
        graph.constant(qlinear_args(n)[k]).nbytes for n in qlinears for k in ("lowrank_a", "lowrank_b", "lowrank_scale"))
    assert _logit_error(graph, reference, ids) < 0.7 * _logit_error(plain, reference, ids)


def test_options_and_migrated_layers_are_named(tiny_llama, calibration, token_ids):
    with pytest.raises(LqcConfigError, match="rank is 0"):
        PassManager([{"pass": "lowrank", "rank": 0}])
    graph = trace(tiny_llama, token_ids)
    with pytest.warns(UserWarning, match="put the lowrank pass after a quantize pass"):
        PassManager([{"pass": "lowrank"}]).run(graph, PassContext(calibration=calibration, progress=False))
    graph = trace(tiny_llama, token_ids)
    with pytest.raises(LqcConfigError, match="needs calibration data"):
        PassManager([{"pass": "quantize"}, {"pass": "lowrank"}]).run(graph, PassContext(progress=False))
    graph = trace(tiny_llama, token_ids)
    recipe = [{"pass": "quantize", "format": "int4", "group_size": 32, "method": "awq", "calibration_tokens": 512,
               "awq_samples": 64, "awq_grid": 4, "kernels": False}, {"pass": "lowrank", "rank": 4, "calibration_tokens": 512}]
    with pytest.warns(UserWarning, match="scale-migrated by awq or smoothquant"):
        PassManager(recipe).run(graph, PassContext(calibration=calibration, progress=False))


def test_cpu_lowering_multiplies_float_factors_with_the_same_result(tiny_llama, calibration):
    """pack_cpu_layouts turns int8 factors into float32 ``a`` and ``b * scale`` (decode converts
    nothing per call); the model computes what the canonical graph computes, to bf16 kernel precision."""
    import lqc

    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    recipe = [{"pass": "quantize", "format": "int4", "group_size": 32}, {"pass": "lowrank", "rank": 8, "calibration_tokens": 512}]
    results = {}
    for kernels in (False, True):
        compressed = lqc.compress(tiny_llama, [{**recipe[0], "kernels": kernels}, recipe[1]], calibration=calibration,
                                  target="eager", progress=False)
        with torch.no_grad():
            results[kernels] = compressed(ids).logits
        graph = lqc.session_of(compressed).compilations[-1].lowered
        factors = [graph.constant(qlinear_args(n)["lowrank_a"]) for n in graph.nodes if op_name(n) == "lqc::qlinear"]
        assert factors and all(f.dtype == (torch.float32 if kernels else torch.int8) for f in factors)
        torch._dynamo.reset()
    assert (results[True] - results[False]).abs().max() < 0.02 * results[False].abs().max()
