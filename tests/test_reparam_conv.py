"""fold_batchnorm and merge_branches: exact weight reparameterization of conv and linear models."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lqc
import lqc.backend
import lqc.models
from lqc.ir import op_name, trace
from lqc.passes import PassManager
from lqc.passes.numerics import compare_outputs, run_graph

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _seeded():
    # the nn.Module models below draw their weights from the global generator
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def _randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    # Fresh BatchNorms are identities (mean 0, var 1, gamma 1, beta 0): a fold that forgot a term would pass.
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.5)
    return model


def _inputs(*shape, seed: int = 1):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),)


def _apply(graph, inputs, *passes):
    """Run ``passes`` through the pass manager; the relative error of the outputs against the graph before."""
    reference = run_graph(graph, inputs)
    report = PassManager(list(passes)).run(graph)
    rel, _ = compare_outputs(run_graph(graph, inputs), reference)
    print(f"{[r.name for r in report.records]}: rel error {rel:.2e}")
    return report, rel


def _count(graph, name):
    return sum(op_name(n) == name for n in graph.nodes)


# -- models ---------------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv+BN + 1x1 conv+BN (+ BN identity when shapes allow), ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout))
        self.one = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class TinyRepVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(RepVGGBlock(3, 8, stride=2), RepVGGBlock(8, 8), RepVGGBlock(8, 8, groups=2))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


class TokenBatchNormFFN(nn.Module):
    """RePaViT-style: BatchNorm1d over the channels of [B, N, C] tokens (through transposes), then an FFN."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(F.gelu(self.fc1(h)))


class BatchNormMLP(nn.Module):
    """[N, C] features: a BatchNorm before fc1 (nothing before it: folds after) and one after fc1 (folds before)."""

    def __init__(self):
        super().__init__()
        self.bn_in, self.fc1, self.bn_mid, self.fc2 = nn.BatchNorm1d(12), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.bn_mid(self.fc1(self.bn_in(x)))))


class BatchNormThenConvs(nn.Module):
    """A BatchNorm on the input read by two unpadded convs (a grouped 1x1 and a strided 3x3)."""

    def __init__(self, padding=0):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.pointwise = nn.Conv2d(4, 6, 1, groups=2)
        self.strided = nn.Conv2d(4, 6, 3, stride=2, padding=padding)

    def forward(self, x):
        h = self.bn(x)
        return self.pointwise(h).mean((2, 3)) + self.strided(h).mean((2, 3))


# -- fold_batchnorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-resnet", "tiny-mobilevit"])
def test_fold_into_conv_before_hf_image_models(name):
    model = _randomize_batchnorms(lqc.models.load(name).model)
    assert not model.training
    inputs = _inputs(1, 3, 32, 32)
    graph = trace(model, *inputs)
    batch_norms = _count(graph, "batch_norm")
    assert batch_norms > 0
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"}, {"pass": "merge_branches"})
    folded = report.records[0].details.folded
    assert report.records[0].matches == batch_norms == len(folded)
    assert all(f["where"] == "before" for f in folded)
    assert _count(graph, "batch_norm") == 0
    # residual sums of different inputs (ResNet shortcuts, MobileViT's transformer blocks): nothing to merge
    assert report.records[1].matches == 0
    assert rel <= TOLERANCE


def test_transformer_without_batchnorm_is_unchanged(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    nodes = len(graph.gm.graph.nodes)
    report, rel = _apply(graph, (token_ids,), {"pass": "fold_batchnorm"}, {"pass": "merge_branches"})
    assert [r.matches for r in report.records] == [0, 0] and len(graph.gm.graph.nodes) == nodes and rel == 0.0


def test_fold_into_linear_before_and_after():
    model = _randomize_batchnorms(BatchNormMLP()).eval()
    inputs = _inputs(5, 12)
    graph = trace(model, *inputs)
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"})
    folded = {f["batch_norm"]: (f["where"], f["into"]) for f in report.records[0].details.folded}
    assert folded == {"bn_in": ("after", ["fc1"]), "bn_mid": ("before", ["fc1"])}
    assert _count(graph, "batch_norm") == 0 and _count(graph, "linear") == 2
    assert rel <= TOLERANCE


def test_fold_token_batchnorm_into_following_linear():
    model = _randomize_batchnorms(TokenBatchNormFFN()).eval()
    inputs = _inputs(2, 7, 16)
    graph = trace(model, *inputs)
    assert _count(graph, "transpose") == 2
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"})
    assert report.records[0].details.folded == [{"batch_norm": "norm", "where": "after", "into": ["fc1"]}]
    # bn(x.transpose(1, 2)).transpose(1, 2) without the BatchNorm is x: the transposes go too
    assert _count(graph, "batch_norm") == 0 and _count(graph, "transpose") == 0
    assert rel <= TOLERANCE


def test_fold_into_unpadded_convs_after():
    model = _randomize_batchnorms(BatchNormThenConvs(padding=0)).eval()
    inputs = _inputs(1, 4, 9, 9)
    graph = trace(model, *inputs)
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"})
    assert report.records[0].details.folded == [{"batch_norm": "bn", "where": "after", "into": ["pointwise", "strided"]}]
    assert _count(graph, "batch_norm") == 0
    assert rel <= TOLERANCE


def test_conv_after_with_padding_is_left_alone_with_a_warning():
    model = _randomize_batchnorms(BatchNormThenConvs(padding=1)).eval()
    inputs = _inputs(1, 4, 9, 9)
    graph = trace(model, *inputs)
    with pytest.warns(UserWarning, match="pads its input"):
        report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"})
    record = report.records[0]
    assert record.matches == 0 and record.details.folded == []
    assert "pads its input" in record.details.skipped[0]["reason"]
    # the unpadded 1x1 conv must not have been changed alone: both convs still read the BatchNorm
    assert _count(graph, "batch_norm") == 1 and rel == 0.0


def test_training_mode_and_shared_outputs_are_left_alone():
    train = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    inputs = _inputs(2, 3, 8, 8)
    graph = trace(train, *inputs)
    record = PassManager([{"pass": "fold_batchnorm"}]).run(graph).records[0]
    assert record.matches == 0 and "training mode" in record.details.skipped[0]["reason"]
    assert _count(graph, "batch_norm") == 1

    class Shared(nn.Module):  # the conv's output is also read by the add: folding would change it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            c = self.conv(x)
            return self.bn(c) + c

    model = _randomize_batchnorms(Shared()).eval()
    graph = trace(model, *inputs)
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"})
    assert report.records[0].matches == 0 and "other users" in report.records[0].details.skipped[0]["reason"]
    assert _count(graph, "batch_norm") == 1 and rel == 0.0


# -- merge_branches ---------------------------------------------------------------------------------


def test_repvgg_blocks_become_one_conv_each():
    model = _randomize_batchnorms(TinyRepVGG()).eval()
    inputs = _inputs(1, 3, 16, 16)
    graph = trace(model, *inputs)
    assert _count(graph, "conv2d") == 6 and _count(graph, "batch_norm") == 8
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"}, {"pass": "merge_branches"})
    fold, merge = report.records
    # the identity BatchNorms have nothing to fold into: merge_branches takes them
    assert fold.matches == 6 and len(fold.details.skipped) == 2
    assert merge.matches == 3
    assert [len(m["branches"]) for m in merge.details.merged] == [2, 3, 3]
    assert _count(graph, "conv2d") == 3 and _count(graph, "batch_norm") == 0 and _count(graph, "add") == 0
    assert all(graph.constant(n.args[1]).shape[-2:] == (3, 3) for n in graph.nodes if op_name(n) == "conv2d")
    assert rel <= TOLERANCE


def test_merge_respects_ignore():
    model = _randomize_batchnorms(TinyRepVGG()).eval()
    inputs = _inputs(1, 3, 16, 16)
    graph = trace(model, *inputs)
    ignore = [r"^blocks\.1(\.|$)"]
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm", "ignore": ignore}, {"pass": "merge_branches", "ignore": ignore})
    assert report.records[1].matches == 2
    assert _count(graph, "conv2d") == 2 + 2 and _count(graph, "batch_norm") == 3
    assert rel <= TOLERANCE


def test_merge_linear_branches_with_identity():
    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return torch.tanh(self.a(x) + x + self.b(x))

    inputs = _inputs(2, 5, 8)
    graph = trace(Parallel().eval(), *inputs)
    report, rel = _apply(graph, inputs, {"pass": "merge_branches"})
    assert report.records[0].matches == 1
    assert _count(graph, "linear") == 1 and _count(graph, "add") == 0
    assert rel <= TOLERANCE


def test_merge_conv1d_same_padding_with_batchnorm_identity():
    class Conv1dBranches(nn.Module):  # 5-tap + 3-tap "same" convs and a BatchNorm of the input
        def __init__(self):
            super().__init__()
            self.wide, self.narrow = nn.Conv1d(6, 6, 5, padding="same"), nn.Conv1d(6, 6, 3, padding="same", bias=False)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.wide(x) + self.narrow(x) + self.bn(x)

    model = _randomize_batchnorms(Conv1dBranches()).eval()
    inputs = _inputs(2, 6, 10)
    graph = trace(model, *inputs)
    report, rel = _apply(graph, inputs, {"pass": "fold_batchnorm"}, {"pass": "merge_branches"})
    assert report.records[0].matches == 0  # nothing before or after the BatchNorm but the sum
    assert report.records[1].details.merged[0]["into"] == "conv1d (6, 6, 5) padding (2,)"
    assert [op_name(n) for n in graph.nodes if n.op == "call_function"] == ["conv1d"]
    assert rel <= TOLERANCE


def test_unmergeable_branches_are_left_alone():
    class Mismatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.near = nn.Conv2d(4, 4, 3, padding=1)
            self.far = nn.Conv2d(4, 4, 3, padding=2, dilation=2)  # same output shape, different taps
            self.shared = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            s = self.shared(x)  # read twice: merging it would drop its other use
            return self.near(x) + self.far(x) + (s + x) * s

    inputs = _inputs(1, 4, 8, 8)
    graph = trace(Mismatched().eval(), *inputs)
    report, rel = _apply(graph, inputs, {"pass": "merge_branches"})
    record = report.records[0]
    assert record.matches == 0
    assert any("dilation" in s["reason"] for s in record.details.skipped)
    assert _count(graph, "conv2d") == 3 and rel == 0.0


# -- through the backend ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-resnet", "repvgg"])
def test_backend_recipe_matches_eager(name):
    model = TinyRepVGG().eval() if name == "repvgg" else lqc.models.load(name).model
    model = _randomize_batchnorms(model)
    (x,) = _inputs(1, 3, 32, 32)
    recipe = [{"pass": "fold_batchnorm"}, {"pass": "merge_branches"}]
    compiled = torch.compile(model, backend="lqc", options={"recipe": recipe, "target": "eager"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to Inductor warns
        eager = model(x)
        out = compiled(x)
    eager = eager.logits if hasattr(eager, "logits") else eager
    out = out.logits if hasattr(out, "logits") else out
    (compilation,) = lqc.session_of(compiled).compilations
    report, graph = compilation.report, compilation.graph
    assert not report.fallback and report.records[0].matches > 0
    assert _count(graph, "batch_norm") == 0
    rel, _ = compare_outputs([out], [eager])
    print(f"{name} through the backend: rel error {rel:.2e}")
    assert rel <= TOLERANCE
