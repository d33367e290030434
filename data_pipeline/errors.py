"""The one exception type the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad or mismatched input data: the message names the file, what was found and the fix."""
