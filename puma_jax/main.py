r"""The PUMA pipeline from one command.

  python -m puma_jax.main --config=configs/default.py --workdir=/tmp/puma_default

Runs prepare -> margin_model -> margins -> prune -> train -> evaluate -> report,
skipping every stage whose output in the workdir is already complete. Rerun the
same command to resume. `--stage=NAME` runs one stage; `--config.x.y=v`
overrides a config field.

Errors print one message on stderr saying what is wrong and the fix (the
traceback with `-v 1`); the exit code is 2 for usage and config errors, 1 for
other failures (`puma_jax/cli.py`).

Multi-host (TPU pods, multi-node GPU): run the same command on every host with
`--distributed`; on TPU pods `jax.distributed.initialize()` finds its peers by
itself, elsewhere pass --coordinator_address, --num_processes and --process_id.
"""

import os

import jax
from absl import flags, logging
from ml_collections import config_flags

from puma_jax import cli, logs, pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for all outputs; reruns resume.')
_STAGE = flags.DEFINE_enum(
  'stage', 'all', ('all', *pipeline.STAGES), 'Run only this stage (default: all, in order).'
)
_DRY_RUN = flags.DEFINE_bool(
  'dry_run',
  False,
  'Margins stage: time a short probe on the current devices and print the time and '
  'device-hours the whole margin computation would take, without computing it.',
)
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed', False, 'Call jax.distributed.initialize() (one command per host).'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (with --distributed, off TPU).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --distributed, off TPU.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --distributed, off TPU.')
_CPU_DEVICES = flags.DEFINE_integer(
  'cpu_devices',
  -1,
  'Devices the CPU is split into when it does the work (no accelerator): -1 (auto) gives '
  'one per core available to this process, the largest power of two up to 8, so the '
  "data-parallel stages use every core; 0 keeps JAX's default (1); N > 0 gives N. Batch "
  'sizes must be multiples of it. Ignored by GPU and TPU runs.',
)
_COMPILATION_CACHE = flags.DEFINE_string(
  'compilation_cache',
  None,
  "XLA's persistent compilation cache (reruns and resumed runs load the compiled programs "
  'instead of compiling them again): default <workdir>/compilation_cache unless '
  'JAX_COMPILATION_CACHE_DIR is set; "" turns it off.',
)
flags.mark_flags_as_required(['config', 'workdir'])
MAX_AUTO_CPU_DEVICES = 8


def auto_cpu_devices(cores: int) -> int:
  """The largest power of two <= min(cores, MAX_AUTO_CPU_DEVICES) (batch sizes divide by it)."""
  return 1 << (max(1, min(cores, MAX_AUTO_CPU_DEVICES)).bit_length() - 1)


def _set_cpu_devices(requested: int) -> None:
  """Splits the CPU into devices; must run before JAX initialises its backends."""
  n = auto_cpu_devices(len(os.sched_getaffinity(0))) if requested < 0 else requested
  if n > 0:
    jax.config.update('jax_num_cpu_devices', n)


def _set_compilation_cache(requested: str | None, workdir: str) -> None:
  """Turns on XLA's persistent compilation cache (JAX_COMPILATION_CACHE_DIR wins)."""
  if requested is None:
    if jax.config.jax_compilation_cache_dir:
      return
    requested = os.path.join(workdir, 'compilation_cache')
  jax.config.update('jax_compilation_cache_dir', requested or None)


def main(argv: list[str]) -> None:
  del argv  # cli.run refuses extra arguments.
  if logging.get_verbosity() < 1:
    logs.quiet_orbax()  # unless -v 1
  _set_cpu_devices(_CPU_DEVICES.value)
  _set_compilation_cache(_COMPILATION_CACHE.value, _WORKDIR.value)
  if _DISTRIBUTED.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  logging.info(
    'puma_jax: workdir %s, stage %s, %d %s devices',
    _WORKDIR.value,
    _STAGE.value,
    jax.device_count(),
    jax.default_backend(),
  )
  pipeline.run(_CONFIG.value, _WORKDIR.value, stage=_STAGE.value, dry_run=_DRY_RUN.value)


def _load_config() -> None:
  """Loads the config file while the flags are parsed, so a bad one is a usage error."""
  _ = _CONFIG.value.seed  # config_flags reports a failed load on first use.


def run() -> None:
  """The command line's entry point (exits 0, 1 or 2)."""
  cli.run(main, check=_load_config, prog='puma_jax.main')


if __name__ == '__main__':
  run()
