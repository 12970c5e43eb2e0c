"""The command line's own logic (the pipeline itself is tested in test_pipeline.py)."""

import pytest

from puma_jax import main


@pytest.mark.parametrize(
  'cores, devices', [(1, 1), (2, 2), (3, 2), (4, 4), (6, 4), (8, 8), (16, 8), (96, 8)]
)
def test_auto_cpu_devices_is_a_power_of_two_within_the_cores(cores, devices):
  assert main.auto_cpu_devices(cores) == devices


def test_default_batch_sizes_divide_over_auto_cpu_devices():
  from configs import default

  config = default.get_config()
  for batch in (config.train.batch_size, config.margins.batch_size, config.eval.batch_size):
    assert batch % main.MAX_AUTO_CPU_DEVICES == 0


def test_the_persistent_compilation_cache_defaults_to_the_workdir(monkeypatch):
  import jax

  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    main._set_compilation_cache(None, '/w')
    assert jax.config.jax_compilation_cache_dir == '/w/compilation_cache'
    main._set_compilation_cache(None, '/other')  # one already set (JAX_COMPILATION_CACHE_DIR)
    assert jax.config.jax_compilation_cache_dir == '/w/compilation_cache'
    main._set_compilation_cache('/cache', '/w')
    assert jax.config.jax_compilation_cache_dir == '/cache'
    main._set_compilation_cache('', '/w')
    assert not jax.config.jax_compilation_cache_dir
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


# --- Errors on the command line: one message on stderr, exit 2 (usage/config) or 1 -----------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from puma_jax import cli, config_base, pipeline, stages  # noqa: E402
from puma_jax.datasets import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = '--config=configs/default.py:tiny'


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'puma_jax.main', *args, '--cpu_devices=1'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
  """The lines of stderr that are not absl log lines (I1206 12:00:00.0 ... ] ...)."""
  return [
    line
    for line in result.stderr.splitlines()
    if line.strip() and not (line[:1] in 'IWEF' and line[1:5].isdigit())
  ]


def _assert_one_message(result, code: int, *needles: str) -> str:
  lines = _error_lines(result)
  assert result.returncode == code, result.stderr
  assert 'Traceback' not in result.stderr
  # One message (it may run over a few lines), after every log line.
  assert lines[0].startswith('puma_jax.main: error: '), lines
  assert sum(line.startswith('puma_jax.main: error: ') for line in lines) == 1, lines
  message = '\n'.join(lines)
  for needle in needles:
    assert needle in message, message
  return message


@pytest.mark.parametrize(
  'args, needles',
  [
    ((TINY, '--workdir={w}', '--config.nope=1'), ("unknown config field 'nope'", 'config_base')),
    ((TINY, '--workdir={w}', '--config.train.num_steps=abc'), ('--config.train.num_steps=abc',)),
    (('--config=configs/no_such.py', '--workdir={w}'), ('no_such.py', 'configs/default.py')),
    ((TINY,), ('--workdir', '--helpshort')),
    ((TINY, '--workdir={w}', 'stray'), ("unexpected arguments: ['stray']",)),
    ((TINY, '--workdir={w}', '--config.model.name=resnet'), ("model.name='resnet'", 'wrn')),
    ((TINY, '--workdir={w}', '--stage=train'), ("needs stage 'prepare'", '--stage=prepare')),
  ],
  ids=[
    'unknown_field',
    'bad_override',
    'no_config_file',
    'no_workdir',
    'stray',
    'bad_value',
    'order',
  ],
)
def test_usage_and_config_errors_exit_2_with_one_message(tmp_path, args, needles):
  result = _run(*(a.format(w=tmp_path / 'w') for a in args))
  _assert_one_message(result, cli.USAGE_EXIT, *needles)


def test_a_stage_made_with_other_settings_exits_2_and_says_how_to_proceed(tmp_path):
  from configs import default

  config = default.get_config('tiny')
  config.data.real.num_shards = 3  # Not what the command line asks for.
  pipeline.STAGE_DEFS['prepare'].mark_complete(tmp_path, config, {})
  result = _run(TINY, f'--workdir={tmp_path}', '--stage=prepare')
  _assert_one_message(
    result, cli.USAGE_EXIT, 'data.real.num_shards: 3 -> 2', 'To proceed: use a new --workdir'
  )


def test_a_missing_data_file_exits_1_with_the_fix(tmp_path):
  args = (
    TINY,
    f'--workdir={tmp_path}',
    '--stage=prepare',
    '--config.data.real.kind=cifar10',
    '--config.data.generated.kind=none',
    '--config.data.real.download=False',
    f'--config.data.real.archive_dir={tmp_path / "archives"}',
  )
  result = _run(*args)
  _assert_one_message(
    result, cli.FAILURE_EXIT, 'cifar-10-binary.tar.gz', 'data.real.archive_dir', 'download=True'
  )


def test_verbose_shows_the_traceback(tmp_path):
  result = _run(TINY, f'--workdir={tmp_path}', '--config.model.name=resnet', '-v', '1')
  assert result.returncode == cli.USAGE_EXIT
  assert 'Traceback' in result.stderr and 'ConfigError' in result.stderr
  assert _error_lines(result)[-1].startswith('puma_jax.main: error: model.name=')


@pytest.mark.parametrize(
  'error, code',
  [
    (config_base.ConfigError('x'), 2),
    (stages.ConfigMismatchError('x'), 2),
    (DataError('x'), 1),
    (FileNotFoundError('x'), 1),
    (RuntimeError('x'), 1),
  ],
)
def test_exit_codes(error, code):
  assert cli.exit_code(error) == code


def test_an_unexpected_error_says_how_to_see_the_traceback(capsys):
  assert cli.report(ZeroDivisionError('division by zero'), prog='p') == cli.FAILURE_EXIT
  err = capsys.readouterr().err
  assert err.startswith('p: error: ZeroDivisionError: division by zero')
  assert '-v 1' in err and 'Traceback' not in err
