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


@pytest.mark.parametrize("arch, column", sorted(CLAIMS, key=lambda k: (COLUMNS[k[1]].kv, k)))
def test_cell_is_what_the_page_claims(arch, column):
    cell = check_cell(arch, column)
    assert cell.status not in FAILURES, f"{arch} x {column}: {cell.status}: {cell.reason} (relative error {cell.rel_error})"
    assert cell.status == CLAIMS[arch, column], (
        f"{arch} x {column} is now {cell.text()!r}, docs/models.md says {CLAIMS[arch, column]!r}: "
        f"regenerate it with python -m lqc.support_matrix --out docs/models.md")
