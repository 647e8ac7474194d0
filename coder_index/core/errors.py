"""Exceptions with messages that name the problem and the fix."""


class CoderIndexError(Exception):
    """Base class for errors a user can act on (the CLI prints them without a traceback)."""


class ModelLoadError(CoderIndexError):
    """The CLIP model or its weights could not be loaded."""


class ModelMismatchError(CoderIndexError):
    """An index (or adapter, corpus) was built with another CLIP model than the one in use."""


class IndexFormatError(CoderIndexError):
    """A directory is not a coder-index index, or its files disagree with each other."""


class InputFormatError(CoderIndexError):
    """A user-supplied file (class list, descriptor JSON, output file) is malformed."""
