"""Logging set-up shared by the main job and the experiment scripts."""

import logging as logging_std

from absl import flags, logging


class QuietOrbax(logging_std.Filter):
  """Drops Orbax's INFO lines (one per checkpoint manager, with every option)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or '/orbax/' not in record.pathname


def quiet_orbax() -> None:
  """Hides Orbax's INFO lines on absl's handler (warnings and errors still show)."""
  logging.get_absl_handler().addFilter(QuietOrbax())


def setup_script_logging() -> None:
  """absl INFO logging for scripts that parse their own arguments (argparse, not absl flags)."""
  flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  quiet_orbax()
