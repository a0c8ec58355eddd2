"""The library's exceptions: each says what was wrong and what is accepted."""


class TokenReduceError(Exception):
    """Base class of every error raised by tokenreduce on bad input."""


class ConfigError(TokenReduceError, ValueError):
    """A config value is out of range or inconsistent (raised before the model is touched)."""


class UnsupportedModelError(TokenReduceError, TypeError):
    """No adapter knows this model, or the method cannot act on it."""


class AlreadyAppliedError(TokenReduceError, RuntimeError):
    """A tokenreduce method is already attached to this model (or one of its blocks)."""
