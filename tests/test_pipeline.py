"""lqc.pipeline: one Session per torch.compile call, one Compilation record per captured graph.

The recipe is resolved once per call, each graph is partitioned once, the lowering runs as passes
(verified like the recipe's), and nothing outside the session holds what it compiled.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter

import pytest
import torch

import lqc
import lqc.pipeline
import lqc.viz.annotate
from lqc.ir.errors import VerificationError
from lqc.passes import Pass, PassManager, PassResult
from lqc.passes.lowering import PackCpuLayouts


def _generate_three_graphs(model, options):
    """generate() with the dynamic cache: prefill, first decode step, dynamic decode (three graphs)."""
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="lqc", options=options)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
    return lqc.session_of(model.forward)


def test_one_torch_compile_call_resolves_its_recipe_once_and_partitions_each_graph_once(tiny_llama, monkeypatch):
    calls = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name if name != "partition" else f"partition {args[0].name}"] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(lqc.pipeline, "resolve_recipe", counting("resolve", lqc.pipeline.resolve_recipe))
    monkeypatch.setattr(lqc.pipeline, "load_recipe", counting("load", lqc.pipeline.load_recipe))
    monkeypatch.setattr(lqc.viz.annotate, "partition", counting("partition", lqc.viz.annotate.partition))
    session = _generate_three_graphs(tiny_llama, {"recipe": "int8", "target": "eager", "viz": True, "progress": False})

    names = [c.name for c in session.compilations]
    assert names == ["graph0", "graph1", "graph2"] and not any(c.fallback for c in session.compilations)
    assert calls["resolve"] == 1 and calls["load"] == 1  # once for the call, not once per graph
    assert {k: v for k, v in calls.items() if k.startswith("partition")} == {f"partition {n}": 1 for n in names}
    for c in session.compilations:  # the record: captured reference, compressed and lowered graphs, report
        assert c.reference is not None and c.graph is not c.lowered and c.report.kernels
        assert [r.stage for r in c.report.records][-1] == "lowering"
        assert any(str(n.target) == "lqc.qlinear.default" for n in c.graph.nodes)  # canonical: what lqc.save writes


def test_nothing_outside_the_session_keeps_what_it_compiled(tiny_llama, token_ids):
    """No module-level list of reports or graphs: once dynamo lets go of the compiled code, the
    session and every graph it compiled are garbage."""
    session = lqc.Session(recipe="int8", target="eager", progress=False)
    compiled = torch.compile(tiny_llama, backend=session)
    with torch.no_grad():
        compiled(token_ids)
    graph = weakref.ref(session.compilations[0].graph.gm)
    session_ref = weakref.ref(session)
    del compiled, session
    torch._dynamo.reset()
    gc.collect()
    assert session_ref() is None and graph() is None


def test_session_of_finds_the_session_behind_each_way_of_compiling(tiny_llama, token_ids):
    options = {"recipe": "exact", "target": "eager", "progress": False}
    torch._dynamo.reset()
    module = torch.compile(tiny_llama, backend="lqc", options=options)
    with pytest.raises(lqc.LqcError, match="has not run yet"):
        lqc.session_of(module)
    with torch.no_grad():
        module(token_ids)
    assert len(lqc.session_of(module).compilations) == 1
    session = lqc.Session(options)
    function = torch.compile(tiny_llama.forward, backend=session)
    assert lqc.session_of(function) is session
    compressed = lqc.compress(tiny_llama, "exact", progress=False)
    assert lqc.session_of(compressed).graphs == compressed._lqc_compression.graphs
    with pytest.raises(lqc.LqcError, match="not compiled by lqc"):
        lqc.session_of(torch.compile(tiny_llama, backend="eager"))


class BreaksQLinears(Pass):
    """A deliberately broken lowering: gives every qlinear a format no kernel knows."""

    name = "breaks_qlinears"
    stage = "lowering"

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.target is torch.ops.lqc.qlinear.default:
                node.update_arg(5, "int3")
        return PassResult()


def test_verify_each_catches_a_broken_lowering(tiny_llama, token_ids, monkeypatch):
    """The lowering runs in the pass manager: its graph is verified after each lowering pass like
    after any recipe pass, and the failure names the pass (the graph falls back, warned)."""
    graph = lqc.ir.trace(tiny_llama, token_ids)
    PassManager([{"pass": "quantize", "format": "int8"}]).run(graph)
    with pytest.raises(VerificationError, match="after pass 'breaks_qlinears'.*unknown format 'int3'"):
        PassManager([PackCpuLayouts(), BreaksQLinears()]).run(graph)

    monkeypatch.setattr(lqc.pipeline, "lowering_passes", lambda *args: [BreaksQLinears()])
    session = lqc.Session(recipe="int8", target="eager", progress=False)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.warns(UserWarning, match="falls back to Inductor.*breaks_qlinears"):
        torch.compile(tiny_llama, backend=session)(token_ids)
    (compilation,) = session.compilations
    assert "breaks_qlinears" in compilation.fallback
