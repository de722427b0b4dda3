"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class FluidbenchError(Exception):
    """Bad input or settings: the message names the field, file or expected shape, on one line."""
