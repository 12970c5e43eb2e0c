"""The one Markdown table renderer."""

import pytest

from puma_jax import tables


def test_markdown_table_aligns_the_first_column_left_and_the_others_right():
  text = tables.markdown_table(['name', 'n', 'share'], [['a', 1, '5.0%'], ['bb', 22, None]])
  assert text.splitlines() == [
    '| name | n | share |',
    '|---|---:|---:|',
    '| a | 1 | 5.0% |',
    '| bb | 22 | None |',
  ]


def test_a_row_of_another_width_names_the_row():
  with pytest.raises(ValueError, match='row 1 has 1 cells, expected 2'):
    tables.markdown_table(['a', 'b'], [[1, 2], [3]])
