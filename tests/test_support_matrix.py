"""The support matrix (tests/support_matrix.py): every cell's check passes or is a refusal by apply_mosear
(never a failure), and equals the committed docs/support_matrix.json, which the README shows."""

import pytest
import transformers

from tests import support_matrix as matrix
from tests.families import FAMILIES

COMMITTED = matrix.load()
SAME_TRANSFORMERS = COMMITTED["transformers"] == transformers.__version__


def _cells():
    for name in FAMILIES:
        for column in matrix.COLUMNS:
            slow = column == "export" and name in matrix.EXPORT_FAMILIES
            yield pytest.param(name, column, marks=[pytest.mark.slow] if slow else [], id=f"{name}-{column}")


@pytest.mark.parametrize("family, column", list(_cells()))
def test_cell(family, column):
    cell = matrix.run_cell(family, column)
    assert not cell.startswith("fail"), f"{family} / {column}: {cell}"
    if not SAME_TRANSFORMERS:
        print(f"docs/support_matrix.json is for transformers {COMMITTED['transformers']}, this is "
              f"{transformers.__version__}: the cell passed its check ({cell}) but is not compared")
        return
    assert cell == matrix.committed_cell(COMMITTED, family, column), (
        f"{family} / {column} is now {cell!r}; rerun `python -m tests.support_matrix --write`")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_refusal_messages_are_current(family):
    row = next(r for r in COMMITTED["families"] if r["family"] == family)
    notes = matrix.refusals(family)
    assert all(message.split(":", 1)[0].strip() and ": " in message for message in notes.values())  # names it
    if not SAME_TRANSFORMERS:
        print(f"docs/support_matrix.json is for transformers {COMMITTED['transformers']}: messages not compared")
        return
    assert notes == row["refusals"]


def test_the_committed_matrix_lists_every_family_and_the_readme_shows_it():
    assert [row["family"] for row in COMMITTED["families"]] == list(FAMILIES)
    assert COMMITTED["columns"] == list(matrix.COLUMNS)
    readme = matrix.README.read_text()
    assert matrix.replace_block(readme, matrix.render(COMMITTED)) == readme, (
        "README.md's support matrix differs from docs/support_matrix.json; rerun "
        "`python -m tests.support_matrix --write`")
