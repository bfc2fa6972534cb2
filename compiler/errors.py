"""User-facing errors.

Every problem a user can cause (a bad file, an unsupported config, a bad argument) is raised as a
:class:`HardwireError`; the CLI prints its one-line message and exits with status 2.
"""


class HardwireError(Exception):
    """A problem with the user's input, reported as one line (no traceback)."""

    def __init__(self, message, *, path=None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ModelFormatError(HardwireError):
    """A model or tokenizer file is malformed, truncated or of an unknown format."""


class UnsupportedConfigError(HardwireError):
    """A model's configuration is valid Llama but outside what hardwire supports."""
