"""docs/tutorial.md cannot rot: every ```python block runs, in order, in one namespace.

The blocks share one namespace (later blocks use the names of earlier ones), and
their `assert`s check what the prose claims, so the tutorial checks itself. A
failure names the block, the markdown line and its text. Blocks tagged with any
other language (```bash, ```text) are shown, not run; a fence without a tag is
refused, so no code block is skipped by accident.

Run the tutorial with its printed output (4 emulated CPU devices):

  PYTHONPATH=$PWD python tests/test_tutorial.py
"""

import dataclasses
import os
import re
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / 'docs' / 'tutorial.md'
# An opening or closing fence: three or more backticks or tildes, then the info string.
_FENCE = re.compile(r'^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*?)\s*$')


class TutorialError(AssertionError):
  """A code block of the tutorial failed; the message names the block and the line."""


@dataclasses.dataclass(frozen=True)
class Block:
  """One ```python block.

  Attributes:
    number: 1-based position among the python blocks.
    line: 1-based line of the markdown file holding the block's first code line.
    code: the block's text, without the fences.
  """

  number: int
  line: int
  code: str


def extract_blocks(text: str, name: str = 'docs/tutorial.md') -> list[Block]:
  """The ```python blocks of a markdown text, in order.

  Raises:
    TutorialError: for a fence without a language tag, an indented fence (e.g. in a
      list item, which this reader does not follow) or a fence never closed.
  """
  blocks, lines = [], text.splitlines()
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
        '```python and anything else ```text or ```bash.'
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
    if info.split()[0] == 'python':
      code = '\n'.join(lines[start:i])
      blocks.append(Block(number=len(blocks) + 1, line=start + 1, code=code + '\n'))
    i += 1
  return blocks


def run_blocks(
  blocks: list[Block], path: Path, namespace: dict | None = None, *, name: str | None = None
) -> dict:
  """Executes the blocks in order in one namespace; returns the namespace.

  Each block is compiled under the markdown file's name with its own line
  numbers, so tracebacks (and this function's errors) point at the markdown.

  Args:
    blocks: from `extract_blocks(path.read_text())`.
    path: the markdown file (its lines are quoted in errors).
    namespace: the globals to run in (and to update); a fresh one by default.
    name: how errors name the file; `path.name` by default.

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
    try:
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
  return namespace


def test_tutorial_runs():
  blocks = extract_blocks(TUTORIAL.read_text())
  assert len(blocks) >= 10, f'{TUTORIAL} has only {len(blocks)} python blocks'
  # A TutorialError names the block and line; its cause's traceback shows the markdown lines.
  run_blocks(blocks, TUTORIAL, name='docs/tutorial.md')


def test_relative_links_resolve():
  text = TUTORIAL.read_text()
  links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text)
  local = [link for link in links if '://' not in link]
  assert local, 'the tutorial links no project file'
  broken = [link for link in local if not (TUTORIAL.parent / link).exists()]
  assert not broken, f'{TUTORIAL} links files that do not exist: {broken}'


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
  # Standalone: the tutorial with its printed output, on 4 emulated CPU devices.
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')
  sys.path.insert(0, str(ROOT))
  run_blocks(extract_blocks(TUTORIAL.read_text()), TUTORIAL, name='docs/tutorial.md')
