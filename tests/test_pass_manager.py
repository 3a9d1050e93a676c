"""The pass manager: order, verification, provenance, statistics, dumps, targets/ignore, recipes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from lqc.ir import LqcConfigError, VerificationError, op_name, trace
from lqc.passes import (
    Pass, PassContext, PassManager, PassOptions, PassResult, load_recipe, register_pass, unregister_pass,
)


@pytest.fixture
def graph(tiny_llama, token_ids):
    return trace(tiny_llama, token_ids)


@dataclass
class RecordOptions(PassOptions):
    label: str = "x"


class RecordOrder(Pass):
    name = "test_record_order"
    Options = RecordOptions
    log: list = []

    def run(self, graph, ctx):
        RecordOrder.log.append(self.options.label)
        return PassResult()


class CountLinears(Pass):
    """Counts the linears that targets/ignore select; rewrites nothing."""

    name = "test_count_linears"
    selected: list = []

    def run(self, graph, ctx):
        CountLinears.selected = [graph.module_path(n) for n in graph.nodes if op_name(n) == "linear" and self.selects(n)]
        return PassResult(matches=len(CountLinears.selected))


class ReluToSigmoid(Pass):
    """Deliberately changes numerics: replaces every silu with a sigmoid (for error and provenance)."""

    name = "test_silu_to_sigmoid"

    def run(self, graph, ctx):
        from lqc.ir.provenance import derived_from

        count = 0
        for node in list(graph.nodes):
            if op_name(node) == "silu" and self.selects(node):
                with derived_from(graph, [node]), graph.gm.graph.inserting_before(node):
                    new = graph.gm.graph.call_function(torch.sigmoid, node.args)
                node.replace_all_uses_with(new)
                graph.gm.graph.erase_node(node)
                count += 1
        return PassResult(matches=count)


class BreakOutput(Pass):
    """Deliberately breaks the graph: slices the logits, changing the output shape."""

    name = "test_break_output"

    def run(self, graph, ctx):
        output = graph.output_node()
        logits = output.args[0][-1]
        with graph.gm.graph.inserting_before(output):
            cut = graph.gm.graph.call_function(torch.narrow, (logits, -1, 0, 3))
        output.args = ((*output.args[0][:-1], cut),)
        return PassResult()


class ShrinkWeight(Pass):
    """Deliberately breaks the graph without touching a node: a linear's weight loses an input
    column (shape propagation, which keeps the values of unchanged nodes, must see it)."""

    name = "test_shrink_weight"

    def run(self, graph, ctx):
        node = next(n for n in graph.gm.graph.find_nodes(op="get_attr") if getattr(graph.gm, n.target).dim() == 2
                    and any("linear" in str(u.target) for u in n.users))
        setattr(graph.gm, node.target, getattr(graph.gm, node.target)[:, :-1].clone())
        return PassResult()


def test_a_constant_changed_in_place_of_a_node_is_verified(graph):
    with pytest.raises(VerificationError, match="shapes do not propagate after pass 'test_shrink_weight'"):
        PassManager([{"pass": "cleanup"}, ShrinkWeight()]).run(graph)


def test_passes_run_in_recipe_order(graph):
    RecordOrder.log.clear()
    PassManager([RecordOrder(label="a"), RecordOrder(label="b"), RecordOrder(label="c")]).run(graph)
    assert RecordOrder.log == ["a", "b", "c"]


def test_verification_failure_names_the_pass(graph):
    with pytest.raises(VerificationError) as info:
        PassManager([{"pass": "cleanup"}, BreakOutput()]).run(graph)
    message = str(info.value)
    assert "after pass 'test_break_output'" in message
    assert "outputs changed" in message and "f32[1, 12, 256]" in message and "f32[1, 12, 3]" in message


def test_statistics_provenance_and_numeric_check(graph, token_ids):
    report = PassManager([{"pass": "cleanup"}, ReluToSigmoid()], verify=True).run(
        graph, PassContext(check_inputs=[(token_ids,)])
    )
    cleanup, swap = report.records
    assert cleanup.rel_error == 0.0 and cleanup.cosine == pytest.approx(1.0)
    assert cleanup.nodes_removed and not cleanup.nodes_added
    assert cleanup.nodes_after == cleanup.nodes_before - len(cleanup.nodes_removed)
    assert swap.matches == 2 and len(swap.nodes_added) == 2 and len(swap.nodes_removed) == 2
    assert 1e-4 < swap.rel_error < 1.0 and swap.cosine < 1.0
    assert swap.bytes_before == swap.bytes_after == graph.param_bytes()
    # every new sigmoid came from the silu it replaced, and carries that in its meta
    for new in swap.nodes_added:
        assert swap.provenance[new] == [swap.nodes_removed[swap.nodes_added.index(new)]]
        assert graph.find(new).meta["lqc_provenance"]["pass"] == "test_silu_to_sigmoid"
    assert swap.seconds >= 0


def test_debug_dir_has_one_file_per_pass_and_a_summary(graph, tmp_path, token_ids):
    PassManager([{"pass": "cleanup"}, ReluToSigmoid()], verify=True, debug_dir=tmp_path).run(
        graph, PassContext(check_inputs=[(token_ids,)])
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_capture.txt", "01_cleanup.txt", "02_test_silu_to_sigmoid.txt", "summary.json", "summary.txt"]
    dump = (tmp_path / "02_test_silu_to_sigmoid.txt").read_text()
    assert "# pass 2: test_silu_to_sigmoid" in dump and "created sigmoid from silu" in dump
    assert "+test_silu_to_sigmoid from silu" in dump  # the node's line in the listing
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    header = summary[1]
    for column in ("pass", "time ms", "nodes +", "nodes -", "bytes before", "bytes after", "rel err", "cosine"):
        assert column in header
    assert summary[3].split()[1] == "capture" and summary[4].split()[1] == "cleanup"


def test_targets_and_ignore(graph):
    PassManager([CountLinears()]).run(graph)
    assert len(CountLinears.selected) == 15  # 7 per block + lm_head
    PassManager([CountLinears(targets=[r"\.mlp\."])]).run(graph)
    assert len(CountLinears.selected) == 6 and all(".mlp." in p for p in CountLinears.selected)
    PassManager([CountLinears(targets=[r"\.mlp\."], ignore=[r"layers\.1\."])]).run(graph)
    assert CountLinears.selected == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    # a pass honours them too: only layer 0's silu is replaced
    record = PassManager([ReluToSigmoid(targets=[r"layers\.0\."])]).run(graph).records[0]
    assert record.matches == 1


def test_recipe_from_dicts_yaml_and_registry(tmp_path, graph):
    register_pass(RecordOrder)
    try:
        RecordOrder.log.clear()
        path = tmp_path / "recipe.yaml"
        path.write_text("passes:\n  - pass: test_record_order\n    label: from-yaml\n  - pass: cleanup\n")
        passes = load_recipe(str(path))
        assert [p.name for p in passes] == ["test_record_order", "cleanup"]
        PassManager(str(path)).run(graph)
        assert RecordOrder.log == ["from-yaml"]
    finally:
        unregister_pass("test_record_order")


def test_recipe_errors_name_the_fix():
    with pytest.raises(LqcConfigError, match=r"no pass named 'cleanpu'.*Did you mean 'cleanup'"):
        load_recipe([{"pass": "cleanpu"}])
    with pytest.raises(LqcConfigError, match=r"pass 'cleanup' has no option 'target'.*Did you mean 'targets'"):
        load_recipe([{"pass": "cleanup", "target": "mlp"}])
    with pytest.raises(LqcConfigError, match=r"cleanup.targets must be a list"):
        load_recipe([{"pass": "cleanup", "targets": 3}])
    with pytest.raises(LqcConfigError, match=r"no 'pass' key"):
        load_recipe([{"targets": []}])
    with pytest.raises(LqcConfigError, match=r"neither a named recipe nor a file"):
        load_recipe("does/not/exist.yaml")


def test_pass_requiring_calibration_fails_clearly(graph):
    class NeedsData(Pass):
        name = "test_needs_data"
        requires = frozenset({"calibration"})

        def run(self, graph, ctx):
            return PassResult()

    with pytest.raises(LqcConfigError, match=r"pass 'test_needs_data' needs calibration data"):
        PassManager([NeedsData()]).run(graph)


def test_cleanup_is_exact_and_keeps_in_place_cache_writes(tiny_llama):
    from lqc.ir import capture
    from lqc.passes.numerics import compare_outputs, run_graph

    graphs = []

    def backend(gm, example_inputs):
        # snapshot the inputs now: running the graph advances the cache counter in place
        graphs.append((capture(gm, example_inputs), [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]))
        return gm.forward

    tiny_llama.forward = torch.compile(tiny_llama.forward, backend=backend)
    with torch.no_grad():
        tiny_llama.generate(torch.randint(0, 256, (1, 5)), max_new_tokens=3, do_sample=False, cache_implementation="static")
    graph, args = graphs[-1]
    inputs = [args[i.index] for i in graph.inputs]
    reference = run_graph(graph, inputs)
    copies_before = sum(1 for n in graph.nodes if op_name(n) == "index_copy_")
    PassManager([{"pass": "cleanup"}]).run(graph)
    assert sum(1 for n in graph.nodes if op_name(n) == "index_copy_") == copies_before == 4
    rel, cos = compare_outputs(run_graph(graph, inputs), reference)
    assert rel == 0.0
