"""Exceptions raised by edgekv. Every failure a user can cause maps to one of these."""


class EdgekvError(Exception):
    """Base class for all edgekv errors."""


class ModelLoadError(EdgekvError):
    """A model file is missing, malformed, truncated or of an unsupported kind."""


class ModelNotFoundError(ModelLoadError):
    """A model name is neither a file on disk nor a known registry entry, or cannot be fetched."""


class IntegrityError(ModelLoadError):
    """A downloaded or cached model file does not match its pinned sha256."""


class TokenizerError(EdgekvError):
    """The tokenizer described by a GGUF file cannot be built or used."""


class ContextOverflowError(EdgekvError):
    """More tokens were submitted than the context window holds."""


class ModelClosedError(EdgekvError):
    """A Model was used after close()."""
