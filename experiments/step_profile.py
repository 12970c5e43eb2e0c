"""Where a compiled XLA:CPU program spends its threads' time: conv/matmul kernels or the rest.

`profile_call` runs a jitted call once under `jax.profiler.trace` and returns, from
the Perfetto trace and the compiled HLO text:

* the thread-seconds spent in HLO instructions that contain a convolution or a dot
  (fusions included, e.g. XLA:CPU's YNNPACK fusions) and the FLOPs those
  instructions execute (2 per multiply-add, counted from their shapes in the HLO);
* the thread-seconds spent in every other instruction, by kind (elementwise
  fusions, all-reduce, copies, ...).

Loops (`while`) are not counted themselves: the instructions inside them are, once
per iteration. The instruction names in the trace are those of the compiled HLO;
this reads XLA:CPU's traces as of jax 0.10 and may need updating with XLA.
"""

import collections
import glob
import gzip
import json
import re
import tempfile

import jax

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (.*)$')
_ARRAY = re.compile(r'^\w+\[([\d,]*)\]\S* ([\w-]+)\((.*)$')
_TUPLE_END = re.compile(r'^\)\S* ([\w-]+)\((.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?(\S+) \(.*\{$')
# Thread-level bookkeeping in the trace, not work: the executor, waits, Python frames.
_NOT_WORK = ('ThunkExecutor', 'Rendezvous', 'Wait', '$', 'PjitFunction', 'CommonPjRt')
_CONTAINERS = ('while', 'conditional', 'call')


def _dims(text: str) -> list[int]:
  return [int(v) for v in text.split(',')] if text else []


def _size(dims: list[int]) -> int:
  n = 1
  for d in dims:
    n *= d
  return n


def _closing_paren(text: str) -> int:
  depth = 0
  for i, c in enumerate(text):
    depth += {'(': 1, ')': -1}.get(c, 0)
    if depth == 0:
      return i
  return len(text)


def instruction_flops(hlo_text: str) -> tuple[dict[str, int], dict[str, str]]:
  """(FLOPs of each instruction that is or contains a conv or dot, each instruction's opcode)."""
  shapes, opcodes, body_of, computations = {}, {}, {}, collections.defaultdict(list)
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(' '):
      current = m.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, text = m.groups()
    array = _ARRAY.match(text)
    if array:
      dims, opcode, rest = array.groups()
      shapes[name] = _dims(dims)
    else:  # a tuple shape: '(f32[...]{...}, s32[]) opcode(...'
      tail = _TUPLE_END.match(text[_closing_paren(text) :]) if text.startswith('(') else None
      if not tail:
        continue
      opcode, rest = tail.groups()
    opcodes[name] = opcode
    computations[current].append((name, opcode, rest))
    called = re.search(r'calls=%([^,\s]+)', rest)
    if opcode == 'fusion' and called:
      body_of[name] = called.group(1)

  def own_flops(name, opcode, rest):
    operands = re.findall(r'%([^,\s)]+)', rest.split(')', 1)[0])
    if opcode == 'convolution':
      window = re.search(r'window=\{size=([\dx]+)', rest)
      labels = re.search(r'dim_labels=\w+_(\w+)->', rest)
      taps = _size([int(v) for v in window.group(1).split('x')]) if window else 1
      cin = shapes[operands[1]][labels.group(1).index('i')]
      groups = re.search(r'feature_group_count=(\d+)', rest)
      return 2 * _size(shapes[name]) * taps * cin // (int(groups.group(1)) if groups else 1)
    if opcode == 'dot':
      contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
      lhs = shapes[operands[0]]
      k = _size([lhs[i] for i in _dims(contracting.group(1))]) if contracting else 1
      return 2 * _size(shapes[name]) * k
    return 0

  flops = {}
  for instructions in computations.values():
    for name, opcode, rest in instructions:
      if opcode in ('convolution', 'dot'):
        flops[name] = own_flops(name, opcode, rest)
  for name, body in body_of.items():
    total = sum(flops.get(inner, 0) for inner, _, _ in computations.get(body, ()))
    if total:
      flops[name] = total
  return flops, opcodes


def trace_events(trace_dir: str) -> list[dict]:
  """The complete ('X') events of the newest Perfetto trace under `trace_dir`."""
  files = sorted(glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True))
  if not files:
    raise FileNotFoundError(f'{trace_dir}: no perfetto_trace.json.gz; did the trace run?')
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  return [e for e in events if e.get('ph') == 'X']


def summarize(hlo_text: str, events: list[dict]) -> dict:
  """Thread-seconds and FLOPs in conv/dot instructions, and the rest's thread-seconds by kind."""
  flops, opcodes = instruction_flops(hlo_text)
  matmul_s, matmul_flops, calls = 0.0, 0, 0
  other = collections.Counter()
  for e in events:
    name = e['name']
    if name not in opcodes or opcodes[name] in _CONTAINERS or name.startswith(_NOT_WORK):
      continue
    seconds = e.get('dur', 0) / 1e6
    if name in flops:
      matmul_s += seconds
      matmul_flops += flops[name]
      calls += 1
    else:
      other[re.sub(r'[.\d]+$', '', name)] += seconds
  return {
    'matmul_thread_s': matmul_s,
    'matmul_gflop': matmul_flops / 1e9,
    'matmul_calls': calls,
    'matmul_gflops_per_thread': matmul_flops / 1e9 / matmul_s if matmul_s else 0.0,
    'other_thread_s': sum(other.values()),
    'other_by_kind_s': dict(other.most_common()),
  }


def profile_call(jitted, *args) -> dict:
  """Runs `jitted(*args)` once under the profiler; `summarize` of it. Returns its result too.

  The call runs the very executable whose HLO is read (compiled ahead of time from
  `jitted`), so the trace's instruction names are that HLO's.
  """
  compiled = jitted.lower(*args).compile()
  hlo_text = compiled.as_text()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      result = jax.block_until_ready(compiled(*args))
    summary = summarize(hlo_text, trace_events(trace_dir))
  return summary, result
