"""How the command-line tools end: one clear message on stderr, exit code 2 or 1.

`run(main)` replaces `absl.app.run(main)` in `python -m puma_jax.main` and
`python -m puma_jax.export`:

- usage and config errors (a bad flag, an unknown config field, a config file
  that does not load, a bad config value, a workdir stage made with other
  settings) print `<prog>: error: <what is wrong and the fix>` and exit with 2;
- other failures (missing or bad data files, a failed download, a diverged
  training run, ...) print the same kind of message and exit with 1; one the
  code does not expect also says how to see its traceback.

The traceback is printed only with `-v 1` (or higher).
"""

import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from puma_jax import config_base, stages

USAGE_EXIT = 2
FAILURE_EXIT = 1

# Errors whose messages already say what is wrong and how to fix it.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
  app.UsageError,
  flags.Error,
  config_base.ConfigError,
  stages.ConfigMismatchError,
)
# The house raises ValueError for bad input (DataError is one), naming the field or file.
KNOWN_FAILURES: tuple[type[BaseException], ...] = (
  ValueError,
  FileNotFoundError,
  FloatingPointError,  # train.NonFiniteLossError: a diverged run, with what to change.
)


PROG = 'puma_jax'  # The name errors start with; `run` sets it.


def exit_code(error: BaseException) -> int:
  """2 for usage and config errors, 1 for every other failure."""
  return USAGE_EXIT if isinstance(error, USAGE_ERRORS) else FAILURE_EXIT


def message(error: BaseException) -> str:
  """The one message printed for `error` (without the traceback)."""
  text = str(error).strip() or type(error).__name__
  if isinstance(error, flags.Error):
    return f'{text}\n  (--helpshort lists the flags)'
  if isinstance(error, USAGE_ERRORS + KNOWN_FAILURES):
    return text
  return f'{type(error).__name__}: {text}\n  (unexpected: rerun with -v 1 to see the traceback)'


def report(error: BaseException, *, prog: str | None = None) -> int:
  """Prints `error` on stderr (its traceback too with -v 1); returns its exit code."""
  if logging.get_verbosity() >= 1:
    traceback.print_exception(error, file=sys.stderr)
  sys.stderr.write(f'{prog or PROG}: error: {message(error)}\n')
  sys.stderr.flush()
  return exit_code(error)


def _verbose_flag(argv: Sequence[str]) -> bool:
  """-v 1 before absl has parsed it (errors while parsing the flags)."""
  for i, a in enumerate(argv):
    for name in ('-v', '--v', '--verbosity'):
      if a == name and i + 1 < len(argv):
        a = f'{name}={argv[i + 1]}'
      if a.startswith(f'{name}='):
        try:
          return int(a.split('=', 1)[1]) >= 1
        except ValueError:
          return False
  return False


def parse_flags(argv: list[str], check: Callable[[], None] | None = None) -> list[str]:
  """absl's flag parsing, with its failures (and those of `check`) as usage errors (exit 2)."""
  try:
    args = flags.FLAGS(argv)
    if check is not None:
      check()
    return args
  except SystemExit:
    raise
  except Exception as e:  # noqa: BLE001 (config_flags raises whatever its parsers raise)
    if _verbose_flag(argv):
      traceback.print_exception(e, file=sys.stderr)
    if not isinstance(e, USAGE_ERRORS):
      e = app.UsageError(_parse_message(e, argv))
    sys.stderr.write(f'{PROG}: error: {message(e)}\n')
    sys.exit(USAGE_EXIT)


def _parse_message(error: Exception, argv: Sequence[str]) -> str:
  text = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
  if isinstance(error, AttributeError | KeyError):
    overrides = [a for a in argv if a.startswith('--config.')]
    return (
      f'unknown config field {text.strip(chr(34) + chr(39))!r} (in {" ".join(overrides) or "--config"}); the fields are '
      'listed, with their meaning, in puma_jax/config_base.py.'
    )
  if isinstance(error, OSError):
    # config_flags lists every path it tried; the OS error says what went wrong.
    reason = [line.strip() for line in str(error).splitlines() if 'Errno' in line]
    return (
      f'cannot load --config: {reason[-1] if reason else text}. Give an existing config file, '
      'e.g. --config=configs/default.py (or configs/default.py:tiny).'
    )
  return f'bad command line: {type(error).__name__}: {text}'


def run(
  main: Callable[[list[str]], None],
  *,
  check: Callable[[], None] | None = None,
  prog: str = 'puma_jax',
) -> None:
  """`absl.app.run(main)` with this module's error reporting (exits 0, 1 or 2).

  Args:
    main: the tool's main(argv).
    check: called after the flags are parsed (e.g. to load the config file);
      what it raises is a usage error.
    prog: the name error messages start with (e.g. 'puma_jax.main').
  """
  global PROG
  PROG = prog

  def wrapped(argv: list[str]) -> None:
    try:
      if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]} (write flags as --name=value)')
      main(argv)
    except (SystemExit, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001 (each failure becomes one message and an exit code)
      sys.exit(report(e))

  app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, check))
