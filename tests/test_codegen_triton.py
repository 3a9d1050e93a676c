"""target="triton": epilogue programs from FX nodes, the generated qlinear kernels against the
torch reference under TRITON_INTERPRET=1, a tiny Llama end to end, the kernel cache, debug_dir.

TRITON_INTERPRET=1 is set before lqc's kernels are imported (see test_triton_dequant_gemm.py)."""

from __future__ import annotations

import os
import types
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lqc  # noqa: E402
from lqc.codegen import kernel_cache  # noqa: E402
from lqc.codegen import dequant_gemm, kv_decode  # noqa: E402
from lqc.codegen.epilogue import EpilogueProgram, Operand, Step, epilogue_program  # noqa: E402
from lqc.codegen.partition import partition  # noqa: E402
from lqc.codegen.qlinear_kernels import kernel_for, launch, rms_norm_reference  # noqa: E402
from lqc.codegen.templates import dot_input_precision  # noqa: E402
from lqc.runtime.quantization.qlinear import qlinear_reference  # noqa: E402
from lqc.runtime.quantization.formats import pad_columns, quantize_fp8, quantize_int4, quantize_int8  # noqa: E402
from tests.sweeps import covering  # noqa: E402

if not dequant_gemm.interpreted() and not torch.cuda.is_available():
    raise RuntimeError("lqc.codegen.dequant_gemm was imported before TRITON_INTERPRET=1 was set and there is no GPU")


@pytest.fixture(autouse=True)
def _kernel_cache_in_tmp(tmp_path, monkeypatch):
    # each test starts cold: an empty cache folder, nothing imported
    monkeypatch.setenv("LQC_KERNEL_CACHE", str(tmp_path / "kernels"))
    kernel_cache.forget_loaded()


def _compressed_graph(model, ids, recipe):
    compressed = lqc.compress(model, recipe, example_inputs=ids, progress=False)
    (graph,) = compressed._lqc_compression.graphs
    return graph


def test_epilogue_programs_from_a_llama_block(tiny_llama, token_ids):
    graph = _compressed_graph(tiny_llama, token_ids, "int8")
    signatures = {}
    for group in partition(graph):
        program = epilogue_program(group.anchor, group.epilogue)
        assert program.stopped_at is None  # everything the partitioner fused, the kernel computes
        signatures[graph.module_path(group.anchor).rsplit(".", 1)[-1]] = program.signature()
    assert signatures["q_proj"] == ""  # nothing fused: the GEMM alone
    assert signatures["o_proj"] in ("v0=add(in0:tile,acc)", "v0=add(acc,in0:tile)")  # the residual add
    assert signatures["down_proj"] == signatures["o_proj"]
    # SwiGLU across two anchors: the later one (up) applies silu to the gate's output and multiplies
    assert signatures["up_proj"] in ("v0=silu(in0:tile);v1=mul(v0,acc)", "v0=silu(in0:tile);v1=mul(acc,v0)")


def test_an_unsupported_step_ends_the_program(tiny_llama, token_ids):
    graph = _compressed_graph(tiny_llama, token_ids, "int8")
    group = next(g for g in partition(graph) if graph.module_path(g.anchor).endswith("o_proj"))
    add = group.epilogue[0]
    with graph.gm.graph.inserting_after(add):
        cast = graph.gm.graph.call_method("to", (add, torch.bfloat16))
    cast.meta["val"] = add.meta["val"].to(torch.bfloat16)
    program = epilogue_program(group.anchor, [add, cast])
    assert program.nodes == [add] and program.stopped_at is cast and "bfloat16" in program.stop_reason


def _quantized(fmt, n, k, group_size, dtype, gen):
    w = torch.randn(n, k, generator=gen)
    if fmt in ("int8", "w8a8"):
        q = quantize_int8(w, fmt=fmt)
        return q.qweight, q.scales.to(dtype), None, k
    if fmt in ("fp8", "fp8_dyn"):
        q = quantize_fp8(w, fmt=fmt)
        return q.qweight, q.scales.to(dtype), None, k
    padded = pad_columns(w, group_size)
    q = quantize_int4(padded, group_size)
    return q.qweight, q.scales.to(dtype), q.zeros.to(dtype), k


PROGRAMS = {
    "gemm": EpilogueProgram(),
    "residual": EpilogueProgram(steps=[Step("add", (Operand("acc"), Operand("tile", 0)))], input_kinds=["tile"]),
    "swiglu": EpilogueProgram(
        steps=[Step("silu", (Operand("tile", 0),)), Step("mul", (Operand("step", 0), Operand("acc")))], input_kinds=["tile"]
    ),
    "bias_gelu_scale": EpilogueProgram(
        steps=[Step("add", (Operand("acc"), Operand("row", 0))), Step("gelu", (Operand("step", 0),)),
               Step("mul", (Operand("step", 1), Operand("const", value=0.5)))],
        input_kinds=["row"],
    ),
    # concat_linears' gate+up: silu of the first half of the GEMM's output times the second
    "split_swiglu": EpilogueProgram(
        steps=[Step("silu", (Operand("half", 0),)), Step("mul", (Operand("step", 0), Operand("half", 1)))], halves=True
    ),
}


@pytest.mark.parametrize("name, fmt, shape, dtype, split_k", covering(
    [list(PROGRAMS), ["int8", "int4", "fp8", "w8a8"]],
    [[(1, 96, 40), (3, 64, 100), (17, 130, 33)], [torch.float32, torch.bfloat16], [1, 2]]))
def test_generated_kernel_matches_the_torch_program(name, fmt, shape, dtype, split_k):
    """Ragged M, K, N (not multiples of the blocks), M = 1; fp32 within 1e-3, bf16 within 1e-2 (relative)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    program = PROGRAMS[name]
    group_size = 32
    rows = 2 * n if program.halves else n  # the GEMM's outputs: both halves of a split program's
    qweight, scales, zeros, k_in = _quantized(fmt, rows, k, group_size, dtype, gen)
    x = torch.randn(m, k_in, generator=gen).to(dtype)
    inputs = [torch.randn(m, n, generator=gen).to(dtype) if kind == "tile" else torch.randn(n, generator=gen).to(dtype)
              for kind in program.input_kinds]
    key = kernel_for(program)
    out = launch(kernel_cache.loaded(key), x, qweight, scales, zeros, None, inputs, program, fmt, group_size, k_in, rows,
                 dtype, block_n=32, split_k=split_k)
    acc = qlinear_reference(x.float(), qweight, scales.float(), None if zeros is None else zeros.float(), None, fmt,
                            group_size, k_in, rows)
    expected = program.run_torch(acc, inputs)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == expected.shape
    assert ((out.float() - expected).norm() / expected.norm()).item() <= tolerance


def _eager_and_triton(model, recipe, ids, **options):
    """(reference model, its logits, the model at target triton, its one compiled graph): the same
    recipe at target eager and at target triton, asserting that the latter warned of nothing left
    outside the kernels."""
    torch._dynamo.reset()
    reference = lqc.compress(model, recipe, example_inputs=ids, progress=False, **options)
    with torch.no_grad():
        expected = reference(ids).logits
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = lqc.compress(model, recipe, example_inputs=ids, progress=False, target="triton", **options)
    assert not [str(w.message) for w in caught if "target='triton'" in str(w.message)]  # every group a kernel
    (lowered,) = [c.fn for c in lqc.session_of(compiled).compilations]  # the CompiledGraph: .fn is the TritonProgram
    return reference, expected, compiled, lowered


@pytest.mark.parametrize("split_k", [1, 2])
def test_split_program_adds_each_halfs_bias(split_k):
    gen = torch.Generator().manual_seed(split_k)
    program = PROGRAMS["split_swiglu"]
    qweight, scales, zeros, k_in = _quantized("int4", 2 * 40, 96, 32, torch.float32, gen)
    x, bias = torch.randn(3, k_in, generator=gen), torch.randn(2 * 40, generator=gen)
    out = launch(kernel_cache.loaded(kernel_for(program)), x, qweight, scales, zeros, bias, [], program, "int4", 32, k_in,
                 2 * 40, torch.float32, block_n=16, block_k=32, split_k=split_k)
    acc = qlinear_reference(x, qweight, scales, zeros, bias, "int4", 32, k_in, 2 * 40)
    expected = torch.nn.functional.silu(acc[:, :40]) * acc[:, 40:]
    assert out.shape == (3, 40) and ((out - expected).norm() / expected.norm()).item() <= 1e-3


@pytest.mark.parametrize("fmt, norm_has_weight, shape, dtype, split_k", covering(
    [["int8", "int4", "fp8", "w8a8", "fp8_dyn"], [False, True]],
    [[(1, 96, 40), (17, 130, 33)], [torch.float32, torch.bfloat16], [1, 2]]))
def test_norm_prologue_matches_torch(fmt, norm_has_weight, shape, dtype, split_k):
    """RMSNorm of x in the kernel's first pass (rstd per row; and the per-token activation scale for
    w8a8 / fp8_dyn over the normalized row) against rms_norm_reference then qlinear_reference."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(m * 7 + k + n + split_k)
    program = PROGRAMS["residual"]
    qweight, scales, zeros, k_in = _quantized(fmt, n, k, 32, dtype, gen)
    x = (3 * torch.randn(m, k_in, generator=gen)).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k_in, generator=gen)).to(dtype) if norm_has_weight else None
    inputs = [torch.randn(m, n, generator=gen).to(dtype)]
    key = kernel_for(program)
    out = launch(kernel_cache.loaded(key), x, qweight, scales, zeros, None, inputs, program, fmt, 32, k_in, n, dtype,
                 norm_weight=norm_weight, norm_eps=1e-5, block_n=32, block_k=32, split_k=split_k)
    normalized = rms_norm_reference(x, norm_weight, 1e-5).float()
    acc = qlinear_reference(normalized, qweight, scales.float(), None if zeros is None else zeros.float(), None, fmt,
                            32, k_in, n)
    expected = program.run_torch(acc, inputs)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    assert ((out.float() - expected).norm() / expected.norm()).item() <= tolerance


def test_tiny_llama_end_to_end_at_target_triton(tiny_llama, token_ids, tmp_path):
    # The reference path: the same int4 weights through lqc::qlinear's float32 reference (kernels:
    # false; the int4 recipe's packed CPU layout computes in bfloat16). At target="triton" the int4
    # recipe's canonical codes go to the kernel as they are (the CPU packing is the eager/Inductor lowering).
    torch._dynamo.reset()
    recipe = [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 32, "method": "hqq", "kernels": False}]
    reference = lqc.compress(tiny_llama, recipe, example_inputs=token_ids, progress=False)
    with torch.no_grad():
        expected = reference(token_ids).logits
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = lqc.compress(tiny_llama, "int4", example_inputs=token_ids, progress=False, target="triton",
                                debug_dir=str(tmp_path / "debug"))
    assert not [w for w in caught if "target='triton'" in str(w.message)]  # every qlinear group became a kernel
    with torch.no_grad():
        logits = compiled(token_ids).logits
    assert (logits - expected).abs().max().item() <= 1e-3
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5  # the same float32 math
    kernels = list((tmp_path / "debug").glob("graph*/kernels/*.py"))
    assert len(kernels) == 3  # plain GEMM, GEMM + residual add, GEMM + SwiGLU: shared by all 14 qlinears
    text = "\n".join(k.read_text() for k in kernels)
    assert "lqc::fused_qlinear" not in text and "# fused_qlinear" in text and "@triton.jit" in text
    assert "qlinear(" in text and "silu(" in text  # the FX nodes each kernel computes, as comments


def test_tiny_llama_int4_matches_eager_in_float32(tiny_llama, token_ids):
    """fp32 logits at target="triton" within 1e-5 relative (max |diff| / max |ref|) of target="eager"
    on the same canonical int4 weights. `kernels: false`: with the default `kernels: true` eager
    runs torch's packed CPU int4 matmul, which computes in bfloat16 (2.3e-3 relative here); the
    Triton kernels compute the canonical weight in float32, "ieee" dots unless TF32 is allowed
    (see the comment in lqc.codegen.triton_target.lower_to_triton)."""
    recipe = [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 32, "kernels": False}]
    assert dot_input_precision() == "ieee"  # torch's default: full float32 products
    _reference, expected, compiled, lowered = _eager_and_triton(tiny_llama, recipe, token_ids)
    code = lowered.fn.graph_module.code
    assert code.count("= torch.ops.lqc.fused_qlinear.default(") == 14 and "lqc.qlinear.default" not in code
    with torch.no_grad():
        logits = compiled(token_ids).logits
    assert logits.dtype == torch.float32
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.fixture
def _restore_float32_matmul_settings():
    allow_tf32, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32


@pytest.mark.usefixtures("_restore_float32_matmul_settings")
def test_dot_input_precision_follows_torchs_float32_setting():
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    assert dot_input_precision() == "ieee"
    torch.backends.cuda.matmul.allow_tf32 = True
    assert dot_input_precision() == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert dot_input_precision() == "ieee"
    for precision, expected in (("high", "tf32"), ("medium", "tf32"), ("highest", "ieee")):
        torch.set_float32_matmul_precision(precision)
        assert dot_input_precision() == expected, precision


@pytest.mark.usefixtures("_restore_float32_matmul_settings")
def test_launch_reads_the_precision_at_each_launch():
    """The generated kernels get INPUT_PRECISION from torch's setting when they launch, not when
    they were generated or compiled; an explicit input_precision wins."""
    seen = []

    class GemmKernel:  # records what the GEMM kernel is launched with
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs["INPUT_PRECISION"])

    module = types.SimpleNamespace(gemm_kernel=GemmKernel())  # stands in for a generated module

    gen = torch.Generator().manual_seed(0)
    qweight, scales, zeros, k_in = _quantized("int4", 32, 64, 32, torch.float32, gen)
    x = torch.randn(2, k_in, generator=gen)

    def run(**kwargs):
        launch(module, x, qweight, scales, zeros, None, [], PROGRAMS["gemm"], "int4", 32, k_in, 32, torch.float32,
               split_k=1, **kwargs)

    torch.set_float32_matmul_precision("highest")
    run()
    torch.set_float32_matmul_precision("high")
    run()
    run(input_precision="ieee")
    assert seen == ["ieee", "tf32", "ieee"]


@pytest.mark.parametrize("fmt", ["int4", "fp8", "w8a8"])
def test_norm_prologue_end_to_end(tiny_llama, token_ids, fmt):
    """concat_linears leaves each RMSNorm one reader (the stacked q/k/v, the stacked gate/up): at
    target="triton" the norm runs inside that qlinear's kernel (and w8a8 quantizes the normalized
    rows there). Logits within 1e-3 of the same recipe at target="eager"."""
    quantize = {"pass": "quantize", "format": fmt, "kernels": False}
    if fmt == "int4":
        quantize.update(group_size=32, method="hqq")
    recipe = [{"pass": "cleanup"}, {"pass": "concat_linears"}, quantize]
    _reference, expected, compiled, lowered = _eager_and_triton(tiny_llama, recipe, token_ids)
    assert lowered.fn.rest == "inductor"  # the nodes outside the kernels: Inductor's code
    gm = lowered.fn.graph_module
    fused = [n for n in gm.graph.nodes if n.target is torch.ops.lqc.fused_qlinear.default]
    with_norm = [n for n in fused if n.args[6] is not None]
    assert len(fused) == 8 and len(with_norm) == 4  # qkv, o, gate_up, down x 2 blocks; qkv and gate_up normalize
    with torch.no_grad():
        logits = compiled(token_ids).logits
    assert (logits - expected).abs().max().item() <= 1e-3


def test_int4_moe_int8_kv_recipe_end_to_end(tiny_llama, token_ids, monkeypatch):
    """The issue's recipe: int4 weights, the FFNs turned into MoE, an int8 KV cache. The qlinears
    run as generated kernels, lqc::moe_ffn as the grouped-GEMM template, the KV attention as the
    flash-decoding kernel. Logits within 1e-3 of the same recipe at target="eager", for the
    prefill and for decode steps over the compressed cache."""
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    recipe = [{"pass": "cleanup"}, {"pass": "ffn_to_moe", "experts": 4, "shared": 1, "top_k": 1},
              {"pass": "quantize", "format": "int4", "group_size": 32, "method": "hqq", "kernels": False},
              {"pass": "compress_kv", "bits": 8, "group": 16, "residual": 4, "sinks": 0}]
    # every group becomes a kernel, the MoE's residual add included (the sum of the experts' rows starts from it)
    reference, expected, compiled, lowered = _eager_and_triton(tiny_llama, recipe, token_ids, calibration=calibration)
    assert lowered.fn.rest == "inductor"
    code = lowered.fn.graph_module.code  # the lowered graph Inductor compiled
    assert code.count("= torch.ops.lqc.moe_ffn_grouped.default(") == 2 and "lqc.moe_ffn.default" not in code
    assert code.count("residual = fused_qlinear") == 2  # the MoE adds the residual stream: o_proj + its residual
    assert code.count("torch.ops.lqc.kv_dynamic_attention.default(") == 2 and len(lowered.fn.lowering.kv_attention) == 2
    assert code.count("= torch.ops.lqc.fused_qlinear.default(") == 8  # 4 attention linears x 2 blocks
    attended = []
    flash = kv_decode.attend_triton
    monkeypatch.setattr(kv_decode, "attend_triton", lambda *a, **kw: attended.append(1) or flash(*a, **kw))
    with torch.no_grad():
        logits = compiled(token_ids).logits
    assert len(attended) == 2  # inside Inductor's code, each KV attention op attended with the flash kernel
    assert (logits - expected).abs().max().item() <= 1e-3
    # decode over the compressed cache: greedy tokens and the last step's logits agree
    torch._dynamo.reset()
    with torch.no_grad():
        ref_out = reference.generate(token_ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        out = compiled.generate(token_ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == ref_out.sequences.tolist()
    assert (out.logits[-1] - ref_out.logits[-1]).abs().max().item() <= 1e-3


def test_second_compile_generates_no_kernel(tiny_llama, token_ids):
    torch._dynamo.reset()
    before = kernel_cache.stats.written
    lqc.compress(tiny_llama, "int4", example_inputs=token_ids, progress=False, target="triton")
    written = kernel_cache.stats.written
    assert written == before + 3
    # warm: the same kernels, from this process's memory
    torch._dynamo.reset()
    lqc.compress(tiny_llama, "int4", example_inputs=token_ids, progress=False, target="triton")
    assert kernel_cache.stats.written == written
    # another process: read back from the cache folder, nothing generated
    kernel_cache.forget_loaded()
    loaded = kernel_cache.stats.loaded
    torch._dynamo.reset()
    lqc.compress(tiny_llama, "int4", example_inputs=token_ids, progress=False, target="triton")
    assert kernel_cache.stats.written == written and kernel_cache.stats.loaded == loaded + 3


def test_cpu_without_the_interpreter_is_a_clear_error(tiny_llama, token_ids, monkeypatch):
    monkeypatch.setattr(dequant_gemm, "interpreted", lambda: False)
    torch._dynamo.reset()
    with pytest.raises(lqc.LqcConfigError, match="set TRITON_INTERPRET=1 before importing lqc"):
        lqc.compress(tiny_llama, "int4", example_inputs=token_ids, progress=False, target="triton")


def test_triton_lowering_is_a_step_and_the_graph_is_partitioned_once(tiny_llama, token_ids, monkeypatch):
    """At target triton the lowering pass partitions the graph and lqc.viz reads its groups from
    the pass's record: one partition per graph. The lowering is a step of the report's timeline."""
    import lqc.codegen.triton_target as triton_target
    import lqc.viz.annotate as annotate

    calls = []
    for module in (triton_target, annotate):
        monkeypatch.setattr(module, "partition", lambda graph, _f=module.partition: calls.append(graph.name) or _f(graph))
    torch._dynamo.reset()
    compressed = lqc.compress(tiny_llama, "int8", example_inputs=token_ids, progress=False, target="triton", viz=True)
    (compilation,) = lqc.session_of(compressed).compilations
    report = compilation.report
    assert calls == [compilation.name]
    assert [(r.name, r.stage) for r in report.records][-1] == ("lower_triton", "lowering")
    assert len(report.snapshots) == len(report.records) + 1 and report.records[-1].nodes_added  # fused calls
    assert report.annotated_step == len(report.records) - 1  # groups name the compressed graph's nodes
    up = next(name for name, k in report.kernels.items() if k["role"] == "swiglu" and k["kind"] == "qlinear")
    assert report.kernels[up]["source"] in report.kernel_sources
