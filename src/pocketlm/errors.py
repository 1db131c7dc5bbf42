"""Errors that the command line reports as one line and exit status 2, without a traceback."""


class PocketLMError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(PocketLMError):
    """A bad flag, preset or config file."""


class DataError(PocketLMError):
    """Missing, empty, undecodable or too-small training text, or an unreachable dataset."""


class CheckpointError(PocketLMError):
    """A checkpoint that is missing, truncated, corrupt, or from a different model."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file that is missing, truncated, edited or non-finite: a resume falls back to
    the previous checkpoint (a different model or different settings are not damage)."""


class TrainingError(PocketLMError):
    """A run that cannot go on, such as one whose loss became NaN."""
