"""codegen.shared_blocks: the graph cut at block boundaries, each distinct block compiled once.

A five-block tiny Llama (shared_blocks needs four or more): logits of prefill and decode steps
into a static cache (which each block updates in place) against the eager target, how many pieces
are compiled, and when the graph compiles whole instead.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import lqc
import lqc.pipeline
from lqc.codegen.shared_blocks import SharedBlockProgram, compile_shared_blocks, signature, split_at_blocks
from lqc.models import TINY_CONFIGS

LAYERS = 5


@pytest.fixture(scope="module")
def five_block_llama():
    _config, _cls, kwargs = TINY_CONFIGS["tiny-llama"]
    config = transformers.LlamaConfig(**{**kwargs, "num_hidden_layers": LAYERS})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _static_cache(model, length=24):
    return transformers.StaticCache(config=model.config, max_cache_len=length)


def _prefill_and_steps(forward, model, ids, steps=3):
    """Logits of a prefill and of ``steps`` greedy decode steps into one static cache."""
    cache = _static_cache(model)
    with torch.no_grad():
        logits = [forward(input_ids=ids, cache=cache, use_cache=True).logits]
        for i in range(steps):
            token = logits[-1][:, -1:].argmax(-1)
            position = torch.tensor([[ids.shape[1] + i]])
            logits.append(forward(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits)
    return logits


def _compiled_graphs(model, ids, options):
    """The programs lqc builds for the prefill and the decode graph (and the graphs they run)."""
    session = lqc.Session({"progress": False, **options})
    forward = torch.compile(model.forward, backend=session, dynamic=False)
    logits = _prefill_and_steps(forward, model, ids)
    return logits, [c.fn for c in session.compilations]


def test_each_distinct_block_compiles_once_and_matches_eager(five_block_llama):
    # int4 weights and an int8 KV cache that each block's attention op updates in place
    # (compress_kv's lqc::kv_static_attention still marks its block: ir.regions)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    recipe = "int4+kv-int8"
    expected, _ = _compiled_graphs(five_block_llama, ids, {"recipe": recipe, "target": "eager"})
    torch._dynamo.reset()
    logits, graphs = _compiled_graphs(five_block_llama, ids, {"recipe": recipe, "target": "inductor"})
    assert len(graphs) == 2  # prefill, decode
    for compiled in graphs:
        assert isinstance(compiled.fn, SharedBlockProgram)
        # the embedding and rotary tables before the blocks, five blocks, the final norm and lm_head
        assert (compiled.fn.pieces, compiled.fn.compiled) == (LAYERS + 2, 3)
    for got, want in zip(logits, expected):  # the same ops: Inductor reorders sums, nothing more
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_share_blocks_false_compiles_the_whole_graph(five_block_llama):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    _, graphs = _compiled_graphs(five_block_llama, ids, {"recipe": "exact", "target": "inductor", "share_blocks": False})
    assert graphs and not any(isinstance(c.fn, SharedBlockProgram) for c in graphs)


def _captured(model, ids, options, monkeypatch):
    """(graph, example inputs) as the backend hands them to codegen, compiled eagerly meanwhile."""
    seen = []
    original = lqc.pipeline.compile_graph

    def recording(graph, target, example_inputs, *args, **kwargs):
        seen.append((graph, list(example_inputs)))
        return original(graph, "eager", example_inputs, *args, **kwargs)

    monkeypatch.setattr(lqc.pipeline, "compile_graph", recording)
    forward = torch.compile(model.forward, backend="lqc", options={"progress": False, **options}, dynamic=False)
    with torch.no_grad():
        forward(input_ids=ids, cache=_static_cache(model), use_cache=True)
    return seen[0]


def test_a_block_unlike_the_others_gets_its_own_compile(five_block_llama, monkeypatch):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    recipe = [{"pass": "quantize", "format": "int8", "ignore": [r"layers\.2\."]}]  # block 2 stays float
    graph, inputs = _captured(five_block_llama, ids, {"recipe": recipe}, monkeypatch)
    compiled_keys = []

    def eager_compile(module, args):  # what Inductor would be asked for, run as is
        compiled_keys.append(signature(module, args))
        return module.forward

    program = compile_shared_blocks(graph, inputs, eager_compile)
    assert [p.key for p in split_at_blocks(graph)] == ["pre", *[f"block {i}" for i in range(LAYERS)], "post"]
    assert (program.pieces, program.compiled) == (LAYERS + 2, 4)  # pre, the int8 block, block 2, post
    assert len(set(compiled_keys)) == 4
    # each run advances the cache's counters in place: both start from copies of the same state
    reference = graph.gm(*[x.clone() for x in inputs])
    torch.testing.assert_close(program(*[x.clone() for x in inputs]), reference, rtol=0, atol=0)  # same ops, same order


def test_fewer_than_four_blocks_compile_whole(monkeypatch):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    two_blocks = lqc.models.load("tiny-llama").model
    graph, inputs = _captured(two_blocks, ids, {"recipe": "exact"}, monkeypatch)
    assert compile_shared_blocks(graph, inputs, lambda module, args: pytest.fail("compiled")) is None
