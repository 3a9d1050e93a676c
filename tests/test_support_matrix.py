"""docs/models.md's support matrix, cell by cell: each architecture x recipe (or pass family) is
run on its tiny random model and must be what the page claims (lqc/support_matrix.py says how a
cell is measured). A cell that crashes, goes beyond its bound or changes nothing silently fails
whatever the page says. After a change, regenerate the page: python -m lqc.support_matrix --out docs/models.md"""

from __future__ import annotations

from pathlib import Path

import pytest

from lqc.support_matrix import ARCHITECTURES, COLUMNS, FAILURES, STATUSES, check_cell, parse_markdown

PAGE = Path(__file__).resolve().parent.parent / "docs" / "models.md"
CLAIMS = parse_markdown(PAGE.read_text())


def test_the_page_covers_every_architecture_and_column_with_a_valid_claim():
    assert set(CLAIMS) == {(a, c) for a in ARCHITECTURES for c in COLUMNS}
    assert set(CLAIMS.values()) <= set(STATUSES), set(CLAIMS.values()) - set(STATUSES)


@pytest.mark.parametrize("arch, column", sorted(CLAIMS))
def test_cell_is_what_the_page_claims(arch, column):
    cell = check_cell(arch, column)
    assert cell.status not in FAILURES, f"{arch} x {column}: {cell.status}: {cell.reason} (relative error {cell.rel_error})"
    assert cell.status == CLAIMS[arch, column], (
        f"{arch} x {column} is now {cell.text()!r}, docs/models.md says {CLAIMS[arch, column]!r}: "
        f"regenerate it with python -m lqc.support_matrix --out docs/models.md")


class _ConvMixerLM(__import__("torch").nn.Module):
    """An architecture lqc knows nothing of: token mixing by a causal depthwise convolution, no
    attention, no KV cache, blocks that are not a list of attention layers."""

    def __init__(self):
        import torch.nn as nn

        super().__init__()
        self.embed = nn.Embedding(128, 32)
        self.mix = nn.Conv1d(32, 32, 3, padding=2, groups=32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 128)

    def forward(self, input_ids):
        import torch.nn.functional as F

        h = self.embed(input_ids)
        h = h + self.mix(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)
        h = h + self.down(F.gelu(self.up(F.layer_norm(h, (32,)))))
        return self.head(h)


@pytest.mark.slow
def test_an_unknown_architecture_compiles_with_every_recipe_and_says_what_it_left():
    """No attention, no decoder blocks: every named recipe compiles it to logits within its
    column's bound, and what could not apply (KV cache, dropping, MoE, ...) is said in one warning."""
    import warnings

    import torch

    import lqc
    from lqc.recipes import named_recipes
    from lqc.support_matrix import _relative_error, _token_ids

    torch.manual_seed(0)
    model, ids = _ConvMixerLM().eval(), _token_ids(16, 0)
    with torch.no_grad():
        reference = model(ids)
    calibration = [_token_ids(128, seed)[0] for seed in (1, 2)]
    said = {}
    for recipe in named_recipes():
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compressed = lqc.compress(model, recipe, calibration=calibration, example_inputs=ids, progress=False)
            with torch.no_grad():
                logits = compressed(ids)
        spec = COLUMNS[recipe]
        assert _relative_error(logits, reference) <= (1e-5 if spec.exact else spec.bound), recipe
        said[recipe] = [str(w.message) for w in caught if str(w.message).startswith("lqc")]
        assert len(said[recipe]) <= 1, (recipe, said[recipe])
    assert "no KV cache to compress" in said["kv-int4"][0]
    assert "keeps every layer: no decoder block" in said["drop"][0]
    assert "has no FFN" in said["moe"][0]
