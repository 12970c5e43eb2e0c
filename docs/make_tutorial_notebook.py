r"""docs/tutorial.ipynb from docs/tutorial.md: the same cells, with the outputs shown.

jupytext turns the markdown into cells (a ```python block becomes a code cell,
the prose and every other block markdown). Then the ```text block pasted right
under a python block (its printed output, see tests/test_tutorial.py) becomes
that code cell's output, so the notebook opens as if it had just been run, and a
first cell installs the package.

  python docs/make_tutorial_notebook.py            # writes docs/tutorial.ipynb
  python docs/make_tutorial_notebook.py --check    # exit 1 if the notebook is stale
"""

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jupytext
import nbformat

DOCS = Path(__file__).resolve().parent
MARKDOWN, NOTEBOOK = DOCS / 'tutorial.md', DOCS / 'tutorial.ipynb'
INSTALL = """\
# Installs puma_jax and its dependencies (once; restart the kernel if pip changed jax).
# From a clone of the repository, with this notebook opened in docs/:
%pip install -q -e ..
# Elsewhere (e.g. Colab), install from the repository instead:
# %pip install -q git+https://github.com/OWNER/puma_jax.git"""
# A markdown cell that starts with a pasted output: ```text, the lines, ```.
_OUTPUT = re.compile(r'\A```text\n(?P<text>.*?)\n?```[ \t]*(?:\n+|\Z)', re.S)


def notebook_from_markdown(text: str) -> nbformat.NotebookNode:
  """The notebook of a tutorial markdown text (nbformat 4, outputs as stdout streams)."""
  cells = [nbformat.v4.new_code_cell(INSTALL)]
  for cell in jupytext.reads(text, fmt='md').cells:
    if cell.cell_type == 'markdown' and cells[-1].cell_type == 'code':
      m = _OUTPUT.match(cell.source)
      if m:
        output = m['text'] + '\n' if m['text'] else ''
        cells[-1].outputs = [nbformat.v4.new_output('stream', name='stdout', text=output)]
        cell.source = cell.source[m.end() :]
        if not cell.source.strip():
          continue
    if cell.cell_type == 'code':
      cells.append(nbformat.v4.new_code_cell(cell.source))
    else:
      cells.append(nbformat.v4.new_markdown_cell(cell.source))
  for i, cell in enumerate(cells):
    cell.id = f'cell-{i}'  # stable ids, so the file changes only where the page does
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata = {
    'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
    'language_info': {'name': 'python'},
  }
  return nb


def render(nb: nbformat.NotebookNode) -> str:
  """The notebook as the JSON text written to disk."""
  return nbformat.writes(nb) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='only compare with the file')
  args = parser.parse_args(argv)
  text = render(notebook_from_markdown(MARKDOWN.read_text()))
  if args.check:
    stale = not NOTEBOOK.exists() or NOTEBOOK.read_text() != text
    print(f'{NOTEBOOK} is {"stale" if stale else "up to date"}')
    return int(stale)
  fd, tmp = tempfile.mkstemp(dir=DOCS, prefix='.tutorial.ipynb.')
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  os.chmod(tmp, 0o644)  # mkstemp makes it private
  os.replace(tmp, NOTEBOOK)
  print(f'wrote {NOTEBOOK}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
