"""docs/tutorial.md cannot rot: every ```python block runs, and prints what the page shows.

The blocks run in order in one namespace (later blocks use the names of earlier
ones), and their `assert`s check what the prose claims, so the tutorial checks
itself. A ```text block right after a ```python block (only blank lines between)
is that block's printed output, pasted: the test checks that the block still
prints it, numbers within a tolerance (`outputs_match`), everything else exactly
(whitespace aside). A block that prints must have its output pasted, and one
that prints nothing must not be followed by a ```text block. A failure names the
block, the markdown line and its text. Blocks tagged with any other language
(```py for code that is shown only, ```shell, ```text) are not run; a fence
without a tag is refused, so no code block is skipped by accident.

Run the tutorial with its printed output (4 emulated CPU devices), or refresh the
pasted outputs after a change (then regenerate the notebook,
`python docs/make_tutorial_notebook.py`):

  PYTHONPATH=$PWD python tests/test_tutorial.py
  PYTHONPATH=$PWD python tests/test_tutorial.py --update
"""

import contextlib
import dataclasses
import importlib.util
import io
import math
import os
import re
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / 'docs' / 'tutorial.md'
NOTEBOOK = ROOT / 'docs' / 'tutorial.ipynb'
# An opening or closing fence: three or more backticks or tildes, then the info string.
_FENCE = re.compile(r'^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*?)\s*$')


class TutorialError(AssertionError):
  """A code block of the tutorial failed; the message names the block and the line."""


# A number as Python and NumPy print them: 3, -0.25, 1e-05, 12.5 (in 12.5%).
_NUMBER = re.compile(r'[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?')
# Pasted numbers may differ from a fresh run by this much (other JAX versions and
# CPUs round differently, and training amplifies it): relative, or absolute.
REL_TOL, ABS_TOL = 0.1, 0.02


@dataclasses.dataclass(frozen=True)
class Block:
  """One ```python block, and the ```text block pasted under it as its output.

  Attributes:
    number: 1-based position among the python blocks.
    line: 1-based line of the markdown file holding the block's first code line.
    code: the block's text, without the fences.
    end: 0-based index of the block's closing fence line.
    output: the pasted output (the ```text block right after), or None.
    output_span: 0-based [first, last] line indices of that ```text block's
      fences, or None.
  """

  number: int
  line: int
  code: str
  end: int = 0
  output: str | None = None
  output_span: tuple[int, int] | None = None


def _fences(text: str, name: str) -> list[tuple[str, int, int]]:
  """(language tag, opening line index, closing line index) of every fenced block."""
  fences, lines = [], text.splitlines()
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, info, start = m['fence'], m['info'], i + 1
    if m['indent']:
      raise TutorialError(
        f'{name}:{start}: an indented code fence; start fences at the beginning of the line '
        '(outside lists) so that the test sees the block.'
      )
    if not info:
      raise TutorialError(
        f'{name}:{start}: a code fence without a language tag; tag code that the test runs '
        '```python, code that is only shown ```py, and anything else ```text or ```shell.'
      )
    i += 1
    while i < len(lines):
      close = _FENCE.match(lines[i])
      # A closing fence has the opening's character, at least its length, and no tag.
      if close and not close['indent'] and not close['info'] and close['fence'][0] == fence[0]:
        if len(close['fence']) >= len(fence):
          break
      i += 1
    else:
      raise TutorialError(f'{name}:{start}: the code fence opened here is never closed.')
    fences.append((info.split()[0], start - 1, i))
    i += 1
  return fences


def extract_blocks(text: str, name: str = 'docs/tutorial.md') -> list[Block]:
  """The ```python blocks of a markdown text, in order, with their pasted outputs.

  Raises:
    TutorialError: for a fence without a language tag, an indented fence (e.g. in a
      list item, which this reader does not follow) or a fence never closed.
  """
  lines, blocks = text.splitlines(), []
  fences = _fences(text, name)
  for j, (lang, open_, close) in enumerate(fences):
    if lang != 'python':
      continue
    output = span = None
    if j + 1 < len(fences):
      next_lang, next_open, next_close = fences[j + 1]
      if next_lang == 'text' and not any(s.strip() for s in lines[close + 1 : next_open]):
        output = ''.join(s + '\n' for s in lines[next_open + 1 : next_close])
        span = (next_open, next_close)
    code = ''.join(s + '\n' for s in lines[open_ + 1 : close])
    blocks.append(Block(len(blocks) + 1, open_ + 2, code, close, output, span))
  return blocks


class _Tee(io.TextIOBase):
  """Writes to a buffer and, optionally, on to another stream."""

  def __init__(self, echo):
    self.buffer, self.echo = io.StringIO(), echo

  def write(self, s):
    self.buffer.write(s)
    if self.echo is not None:
      self.echo.write(s)
    return len(s)


def run_blocks(
  blocks: list[Block],
  path: Path,
  namespace: dict | None = None,
  *,
  name: str | None = None,
  printed: list[str] | None = None,
  echo: bool = False,
) -> dict:
  """Executes the blocks in order in one namespace; returns the namespace.

  Each block is compiled under the markdown file's name with its own line
  numbers, so tracebacks (and this function's errors) point at the markdown.

  Args:
    blocks: from `extract_blocks(path.read_text())`.
    path: the markdown file (its lines are quoted in errors).
    namespace: the globals to run in (and to update); a fresh one by default.
    name: how errors name the file; `path.name` by default.
    printed: if given, each block's standard output is appended to it.
    echo: also write the blocks' output to the real standard output.

  Raises:
    TutorialError: naming the block, its markdown line, and the failing line.
  """
  namespace = {'__name__': '__tutorial__'} if namespace is None else namespace
  filename, name = str(path), name or path.name
  source_lines = path.read_text().splitlines()

  def show(lineno: int) -> str:
    text = source_lines[lineno - 1].strip() if 0 < lineno <= len(source_lines) else '?'
    return f'line {lineno}: {text}'

  for block in blocks:
    where = f'{name} python block {block.number} (starting at line {block.line})'
    try:
      code = compile('\n' * (block.line - 1) + block.code, filename, 'exec')
    except SyntaxError as e:
      raise TutorialError(f'{where} does not compile: {show(e.lineno or 0)}\n{e.msg}') from e
    out = _Tee(sys.stdout if echo else None)
    try:
      with contextlib.redirect_stdout(out):
        exec(code, namespace)
    except Exception as e:
      frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
      # The first tutorial frame is this block's own line; the last, if different, is
      # inside a function that an earlier block defined.
      lines = [show(frames[0].lineno)] if frames else ['?']
      if frames and frames[-1].lineno != frames[0].lineno:
        lines.append(f'  inside {show(frames[-1].lineno)}')
      message = f'{type(e).__name__}: {e}'.strip()
      raise TutorialError(f'{where} failed at {chr(10).join(lines)}\n{message}') from e
    if printed is not None:
      printed.append(out.buffer.getvalue())
  return namespace


def _tokens(text: str) -> list[float | str]:
  """Numbers as floats, every other non-space character as itself."""
  tokens, pos = [], 0
  for m in _NUMBER.finditer(text):
    tokens += [c for c in text[pos : m.start()] if not c.isspace()]
    tokens.append(float(m.group()))
    pos = m.end()
  return tokens + [c for c in text[pos:] if not c.isspace()]


def outputs_match(pasted: str, printed: str) -> str | None:
  """None if `printed` matches `pasted`; otherwise what differs first.

  Numbers match within `REL_TOL` (relative) or `ABS_TOL` (absolute), other
  characters exactly; whitespace is ignored, so NumPy's column padding may change.
  """
  a, b = _tokens(pasted), _tokens(printed)
  for i, (p, q) in enumerate(zip(a, b, strict=False)):
    if isinstance(p, float) and isinstance(q, float):
      if math.isclose(p, q, rel_tol=REL_TOL, abs_tol=ABS_TOL):
        continue
    elif p == q:
      continue
    return f'token {i}: pasted {p!r}, printed {q!r}'
  if len(a) != len(b):
    return f'pasted {len(a)} tokens, printed {len(b)}'
  return None


def check_outputs(blocks: list[Block], printed: list[str], name: str) -> list[str]:
  """The blocks whose pasted output is missing, superfluous or out of date."""
  problems = []
  for block, out in zip(blocks, printed, strict=True):
    where = f'{name} python block {block.number} (line {block.line})'
    if block.output is None and out:
      problems.append(f'{where} prints {out!r} but no ```text block follows it')
    elif block.output is not None and not out:
      problems.append(f'{where} prints nothing, but a ```text block follows it')
    elif block.output is not None and (diff := outputs_match(block.output, out)):
      problems.append(
        f'{where}: the pasted output is out of date ({diff});\n'
        f'pasted:\n{block.output}printed:\n{out}'
      )
  return problems


def paste_outputs(text: str, blocks: list[Block], printed: list[str]) -> str:
  """`text` with each block's ```text output block replaced by (or set to) what it printed."""
  lines = text.splitlines()
  for block, out in reversed(list(zip(blocks, printed, strict=True))):
    new = ['', '```text', *out.rstrip('\n').splitlines(), '```'] if out else []
    if block.output_span is not None:
      lines[block.end + 1 : block.output_span[1] + 1] = new
    else:
      lines[block.end + 1 : block.end + 1] = new
  return '\n'.join(lines) + '\n'


def test_tutorial_runs():
  blocks = extract_blocks(TUTORIAL.read_text())
  assert len(blocks) >= 10, f'{TUTORIAL} has only {len(blocks)} python blocks'
  # A TutorialError names the block and line; its cause's traceback shows the markdown lines.
  printed = []
  run_blocks(blocks, TUTORIAL, name='docs/tutorial.md', printed=printed)
  problems = check_outputs(blocks, printed, 'docs/tutorial.md')
  assert not problems, '\n\n'.join(problems) + (
    '\n\nRefresh them with `PYTHONPATH=$PWD python tests/test_tutorial.py --update` '
    'and regenerate the notebook (`python docs/make_tutorial_notebook.py`).'
  )


def test_relative_links_resolve():
  text = TUTORIAL.read_text()
  links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text)
  local = [link for link in links if '://' not in link]
  assert local, 'the tutorial links no project file'
  broken = [link for link in local if not (TUTORIAL.parent / link).exists()]
  assert not broken, f'{TUTORIAL} links files that do not exist: {broken}'


def _load(script: str):
  """A script of docs/ as a module (docs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / 'docs' / script)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_notebook_is_the_markdown_with_its_outputs():
  import nbformat  # noqa: PLC0415

  make = _load('make_tutorial_notebook.py')
  fresh = make.notebook_from_markdown(TUTORIAL.read_text())
  saved = nbformat.read(NOTEBOOK, as_version=4)

  def cells(nb):
    return [
      (c.cell_type, c.source, [o.get('text') for o in c.get('outputs', [])]) for c in nb.cells
    ]

  assert cells(saved) == cells(fresh), (
    f'{NOTEBOOK} is not {TUTORIAL} any more; run `python docs/make_tutorial_notebook.py`'
  )
  # The first cell installs the package; the markdown's code never does.
  assert '%pip install' in saved.cells[0].source
  assert 'pip install' not in ''.join(b.code for b in extract_blocks(TUTORIAL.read_text()))
  code = [c for c in saved.cells[1:] if c.cell_type == 'code']
  assert [c.source + '\n' for c in code] == [b.code for b in extract_blocks(TUTORIAL.read_text())]
  printed = [c for c in code if c.outputs]
  assert printed and all(c.outputs[0].name == 'stdout' for c in printed)


def test_notebook_takes_each_pasted_output_as_its_cells_output():
  make = _load('make_tutorial_notebook.py')
  nb = make.notebook_from_markdown(
    'Intro.\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\nProse.\n\n'
    '```python\nx = 2\n```\n\nThen:\n\n```text\na formula, not an output\n```\n'
  )
  kinds = [(c.cell_type, c.source) for c in nb.cells]
  assert kinds[1:] == [
    ('markdown', 'Intro.'),
    ('code', 'print(1)'),
    ('markdown', 'Prose.'),
    ('code', 'x = 2'),
    ('markdown', 'Then:\n\n```text\na formula, not an output\n```'),
  ]
  assert nb.cells[2].outputs[0].text == '1\n' and nb.cells[4].outputs == []


def test_figure_script_runs(tmp_path):
  figures = _load('make_tutorial_figures.py')
  paths = figures.main(['--fast', f'--out={tmp_path}'])
  assert [p.name for p in paths] == list(figures.FIGURES)
  for p in paths:
    assert p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', p
  # The tutorial shows the figures the script writes.
  text = TUTORIAL.read_text()
  assert all(f'(img/{name})' in text for name in figures.FIGURES)


@pytest.mark.parametrize(
  'pasted, printed, same',
  [
    ('accuracy 0.940, loss [0.1 2.5]', 'accuracy 0.95, loss [ 0.1  2.6 ]', True),
    ('accuracy 0.94', 'accuracy 0.70', False),  # a number moved
    ('full: 18', 'full: 19', True),
    ('full: 18', 'full: 25', False),
    ('clean 0.9', 'robust 0.9', False),  # the text changed
    ('[1 2 3]', '[1 2]', False),  # a number went missing
    ('6.2%', '6.25%', True),
  ],
)
def test_pasted_outputs_match_numbers_within_a_tolerance(pasted, printed, same):
  assert (outputs_match(pasted, printed) is None) == same


def test_outputs_are_attached_checked_and_pasted():
  text = (
    '```python\nprint(1)\n```\n\n```text\n2\n```\n\nProse.\n\n'
    '```python\nprint(3)\n```\n\n```python\nx = 1\n```\n\n```text\nstale\n```\n'
  )
  blocks = extract_blocks(text, 'sample.md')
  assert [b.output for b in blocks] == ['2\n', None, 'stale\n']
  printed = ['1\n', '3\n', '']
  problems = check_outputs(blocks, printed, 'sample.md')
  assert len(problems) == 3
  assert 'out of date' in problems[0] and 'no ```text block' in problems[1]
  assert 'prints nothing' in problems[2]
  updated = paste_outputs(text, blocks, printed)
  assert updated == (
    '```python\nprint(1)\n```\n\n```text\n1\n```\n\nProse.\n\n'
    '```python\nprint(3)\n```\n\n```text\n3\n```\n\n```python\nx = 1\n```\n'
  )
  assert check_outputs(extract_blocks(updated), printed, 'sample.md') == []


_SAMPLE = """# Title

```python
a = 1
```

Prose with `inline` code.

```text
not run =
```

````python
b = a + 1
s = '''
```
'''
````

~~~bash
echo hi
~~~

```python title="third"
c = b + 1
```
"""


def test_extract_blocks_finds_python_blocks_with_their_lines():
  blocks = extract_blocks(_SAMPLE)
  assert [b.number for b in blocks] == [1, 2, 3]
  assert [b.line for b in blocks] == [4, 14, 25]
  assert blocks[0].code == 'a = 1\n'
  assert blocks[1].code == "b = a + 1\ns = '''\n```\n'''\n"
  assert blocks[2].code == 'c = b + 1\n'
  for b in blocks:
    assert _SAMPLE.splitlines()[b.line - 1] == b.code.splitlines()[0]


@pytest.mark.parametrize(
  'text, error',
  [
    ('intro\n```\nx = 1\n```\n', 'sample.md:2: a code fence without a language tag'),
    ('```python\nx = 1\n', 'sample.md:1: the code fence opened here is never closed'),
    ('- item\n\n  ```python\n  x = 1\n  ```\n', 'sample.md:3: an indented code fence'),
  ],
)
def test_extract_blocks_refuses_untagged_indented_and_unclosed_fences(text, error):
  with pytest.raises(TutorialError, match=re.escape(error)):
    extract_blocks(text, 'sample.md')


def test_blocks_share_a_namespace_and_a_failure_names_block_and_line(tmp_path):
  md = tmp_path / 'lesson.md'
  md.write_text(
    '```python\n'
    'def half(v):\n'
    '  assert v % 2 == 0, "odd"\n'
    '  return v // 2\n'
    '```\n'
    '\n'
    '```python\n'
    'x = half(4)\n'
    'assert x == 2\n'
    'y = half(3)\n'
    '```\n'
  )
  blocks = extract_blocks(md.read_text())
  with pytest.raises(TutorialError) as info:
    run_blocks(blocks, md)
  message = str(info.value)
  assert 'lesson.md python block 2 (starting at line 8) failed at line 10: y = half(3)' in message
  assert 'inside line 3: assert v % 2 == 0, "odd"' in message
  assert 'AssertionError: odd' in message
  namespace = run_blocks(blocks[:1] + [Block(2, 8, 'x = half(4)\n')], md)
  assert namespace['x'] == 2


def test_a_syntax_error_names_block_and_line(tmp_path):
  md = tmp_path / 'lesson.md'
  md.write_text('text\n\n```python\nok = 1\nnot valid(\n```\n')
  with pytest.raises(
    TutorialError, match=r'block 1 \(starting at line 4\) does not compile: line 5'
  ):
    run_blocks(extract_blocks(md.read_text()), md)


if __name__ == '__main__':
  # Standalone: the tutorial with its printed output, on 4 emulated CPU devices;
  # --update pastes the fresh outputs into the markdown.
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')
  sys.path.insert(0, str(ROOT))
  text = TUTORIAL.read_text()
  blocks, printed = extract_blocks(text), []
  run_blocks(blocks, TUTORIAL, name='docs/tutorial.md', printed=printed, echo=True)
  if '--update' in sys.argv[1:]:
    TUTORIAL.write_text(paste_outputs(text, blocks, printed))
    print(f'pasted the outputs into {TUTORIAL}')
  else:
    print('\n'.join(check_outputs(blocks, printed, 'docs/tutorial.md')) or 'outputs match')
