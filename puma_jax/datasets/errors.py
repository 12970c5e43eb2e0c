"""The one exception type for bad data: a file, field or flag that the user must fix."""


class DataError(ValueError):
  """Bad or missing input data. The message names the file (or config field) and the fix."""
