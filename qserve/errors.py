"""Errors users can act on. The CLI prints their message and exits non-zero; the server maps
them to OpenAI-style 4xx bodies. Anything else is a bug."""


class QServeError(Exception):
    """Base for errors caused by the user's input, environment or files."""

    exit_code = 2


class CheckpointError(QServeError):
    """A model directory is missing, incomplete, corrupt or of an unsupported kind."""


class ConfigError(QServeError):
    """A config value (ours or the model's) is invalid or unsupported."""


class BudgetError(QServeError):
    """No variant of the model fits the memory budget."""
