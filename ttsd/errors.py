"""Error types. Each carries a message a user can act on and the CLI exit code it maps to.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; a traceback is shown
only with ``--debug``. Anything that is not a ``TtsdError`` is a bug and exits with 1.
"""

from __future__ import annotations


class TtsdError(Exception):
    """Base of every error ttsd reports to a user."""

    exit_code = 1
    code = "internal"


class ConfigError(TtsdError):
    """Bad command-line option, environment variable or unusable path."""

    exit_code = 3
    code = "config"


class RequestError(TtsdError):
    """Text or options that cannot be spoken (empty, too long, invalid characters, bad speed)."""

    exit_code = 4
    code = "bad_request"


class TextTooLongError(RequestError):
    """Text over the configured maximum length."""

    code = "text_too_long"


class UnknownVoiceError(TtsdError):
    """The request names a voice or version that is not loaded."""

    exit_code = 4
    code = "unknown_voice"


class BusyError(TtsdError):
    """The daemon cannot take the request now (queue full, nothing ready); retry later."""

    exit_code = 10
    code = "busy"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DaemonError(TtsdError):
    """The daemon could not be reached, or answered with an error ``ttsd say`` cannot map."""

    exit_code = 9
    code = "daemon"


class ManifestError(TtsdError):
    """A model folder's ``ttsd.json`` is missing, unreadable or incomplete."""

    exit_code = 5
    code = "bad_manifest"


class VerifyError(TtsdError):
    """A model folder does not match its manifest (missing, extra, changed or unsafe files)."""

    exit_code = 6
    code = "verify_failed"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class LoadError(TtsdError):
    """A verified model folder could not be loaded or warmed up by its engine."""

    exit_code = 7
    code = "load_failed"


class SynthesisError(TtsdError):
    """A loaded voice failed while speaking (exception, NaN or silence): HTTP 500."""

    exit_code = 11
    code = "synthesis_failed"


class ImportPiperError(TtsdError):
    """A Piper voice could not be converted."""

    exit_code = 8
    code = "import_failed"
