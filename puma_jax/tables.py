"""Markdown tables: the one renderer behind every table the library and the experiments print.

Callers format their own cells (each table knows its units); this module only lays
them out, so every report, estimate and study table looks the same and reads as
Markdown both in a terminal and in a rendered page.
"""

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A Markdown table: the first column left-aligned, the others right-aligned.

  Args:
    columns: the header cells.
    rows: one sequence of cells per row (`str()` of each), as many as `columns`.

  Raises:
    ValueError: a row with another number of cells than `columns`.
  """
  lines = ['| ' + ' | '.join(columns) + ' |', '|---|' + '---:|' * (len(columns) - 1)]
  for i, row in enumerate(rows):
    cells = [str(c) for c in row]
    if len(cells) != len(columns):
      raise ValueError(f'markdown_table: row {i} has {len(cells)} cells, expected {len(columns)}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
