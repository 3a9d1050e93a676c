"""Pass contracts the manager relies on: a pass that declares it preserves "regions" leaves the
region annotations exactly as a fresh ``annotate_regions`` would compute them, and the manager
then does not re-annotate."""

from __future__ import annotations

import pytest
import torch

import lqc.models
import lqc.passes.manager
from lqc.ir import annotate_regions, trace
from lqc.passes import Pass, PassContext, PassManager, PassResult, registered_passes

# Tiny models each preserving pass applies to, with its recipe entry. A pass that comes to declare
# "regions" needs a case here (the test below fails until it has one).
CASES = {
    "cleanup": [("tiny-llama", {"pass": "cleanup"}), ("tiny-gpt2", {"pass": "cleanup"}), ("tiny-bert", {"pass": "cleanup"})],
}
PRESERVING = sorted(name for name, cls in registered_passes().items() if "regions" in cls.preserves)
CALIBRATION = [torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(3))]


def region_changes(graph) -> list[str]:
    """What a fresh annotate_regions (on a copy) would change: per node, and the region list."""
    fresh = graph.copy()
    annotate_regions(fresh)
    changes = []
    for mine, theirs in zip(graph.nodes, fresh.nodes):
        assert mine.name == theirs.name
        if mine.meta.get("lqc_region") != theirs.meta.get("lqc_region"):
            changes.append(f"%{mine.name}: {mine.meta.get('lqc_region')!r} -> {theirs.meta.get('lqc_region')!r}")
    if graph.regions != fresh.regions:
        changes.append(f"graph.regions: {graph.regions!r} -> {fresh.regions!r}")
    return changes


def _run(family: str, recipe: list, token_ids):
    graph = trace(lqc.models.load(family).model, token_ids)
    report = PassManager(recipe).run(graph, PassContext(calibration=CALIBRATION, progress=False))
    return graph, report


def test_some_pass_preserves_regions():
    assert "cleanup" in PRESERVING  # else the contract below checks nothing


@pytest.mark.parametrize("name", PRESERVING)
def test_a_pass_that_preserves_regions_leaves_them_as_annotate_regions_would(name, token_ids):
    if name not in CASES:
        pytest.fail(f"pass {name!r} declares it preserves regions: add the tiny models it applies to in CASES")
    for family, entry in CASES[name]:
        torch._dynamo.reset()
        graph, report = _run(family, [entry], token_ids)
        assert not region_changes(graph), (family, region_changes(graph)[:5])
        if (name, family) == ("cleanup", "tiny-llama"):
            assert report.records[0].matches > 0  # no-op casts deleted: the region bookkeeping had work to do


def test_cleanup_keeps_regions_after_another_pass_deleted_a_block(token_ids):
    # drop_layers leaves a graph whose regions the manager re-annotated; cleanup then deletes more
    graph, report = _run("tiny-llama", [{"pass": "drop_layers", "what": "attention", "layers": [1]}, {"pass": "cleanup"}], token_ids)
    assert not region_changes(graph)


def test_the_manager_does_not_re_annotate_after_a_preserving_pass(token_ids, monkeypatch):
    calls = []
    monkeypatch.setattr(lqc.passes.manager, "annotate_regions", lambda graph: calls.append(graph))
    graph = trace(lqc.models.load("tiny-llama").model, token_ids)
    PassManager([{"pass": "cleanup"}]).run(graph, PassContext(progress=False))
    assert calls == []
    PassManager([{"pass": "fold_norms"}]).run(graph, PassContext(progress=False))
    assert calls == [graph]  # a pass that does not preserve regions is followed by a re-annotation


class _CloneAfterANorm(Pass):
    """Declares it preserves regions but leaves the node it creates unannotated."""

    name = "clone_after_a_norm"
    preserves = frozenset({"regions"})

    def run(self, graph, ctx):
        norm = next(n for n in graph.nodes if n.op == "call_function" and getattr(n.meta.get("lqc_region"), "kind", None) == "norm")
        with graph.gm.graph.inserting_after(norm):
            clone = graph.gm.graph.call_function(torch.clone, (norm,))
        clone.meta.update(nn_module_stack=norm.meta["nn_module_stack"], val=norm.meta.get("val"))
        norm.replace_all_uses_with(clone, delete_user_cb=lambda user: user is not clone)
        return PassResult(matches=1)


def test_the_contract_check_catches_a_pass_that_breaks_it(token_ids):
    graph = trace(lqc.models.load("tiny-llama").model, token_ids)
    PassManager([_CloneAfterANorm()]).run(graph, PassContext(progress=False))
    changes = region_changes(graph)
    assert any(change.startswith("%clone") for change in changes), changes
