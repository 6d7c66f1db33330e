"""Error types. Each carries a message a user can act on and the CLI exit code it maps to.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; a traceback is shown
only with ``--debug``. Anything that is not a ``TtsdError`` is a bug and exits with 1.

Every error also says whose fault it is (``fault``), and the daemon keeps the three apart
everywhere (HTTP status, spool ``error.json``, metrics, auto-rollback, canary):

* ``request``: the request's own (bad field, text, voice; 4xx). Never counted against a model.
* ``model``: the model failed on a valid request (exception in the model, NaN, silence; 500).
  Counted: enough of them roll a new version back.
* ``system``: the box (disk full, out of memory, I/O error, queue full; 503/507). Not counted
  against the model; retried where that makes sense (the spool puts the request back).
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass


class TtsdError(Exception):
    """Base of every error ttsd reports to a user."""

    exit_code = 1
    code = "internal"
    status = 500  # HTTP status
    fault = "system"  # request | model | system (see the module docstring)


class ConfigError(TtsdError):
    """Bad command-line option, environment variable or unusable path."""

    exit_code = 3
    code = "config"


class StateLockedError(ConfigError):
    """Another ``ttsd serve`` holds the state dir: two daemons would both write ``state.json``,
    the audit trail and the store."""

    exit_code = 19
    code = "state_locked"


class ConflictError(TtsdError):
    """A control action that cannot be done in the current state (nothing to roll back to, a
    version that cannot serve): HTTP 409."""

    exit_code = 13
    code = "conflict"
    status = 409
    fault = "request"


class RequestError(TtsdError):
    """Text or options that cannot be spoken (empty, too long, invalid characters, bad speed)."""

    exit_code = 4
    code = "bad_request"
    status = 400
    fault = "request"


class SpoolFileError(RequestError):
    """A file in the spool's ``incoming/`` that cannot be a request (a bad name, a link, too
    large, an ID already served, not UTF-8); ``code`` says which, in its ``error.json``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NothingToSpeakError(RequestError):
    """Text that is empty, or only punctuation, symbols or spaces."""


class TextTooLongError(RequestError):
    """Text over the configured maximum length."""

    code = "text_too_long"
    status = 413


class AudioTooLongError(RequestError):
    """The audio the text would make is over the configured maximum (``--max-audio-seconds``)."""

    code = "audio_too_long"
    status = 413


class RequestTimeoutError(RequestError):
    """The client did not send its request in time."""

    code = "request_timeout"
    status = 408


class UnknownVoiceError(TtsdError):
    """The request names a voice or version that is not loaded."""

    exit_code = 4
    code = "unknown_voice"
    status = 404
    fault = "request"


class BusyError(TtsdError):
    """The daemon cannot take the request now (queue full, nothing ready); retry later."""

    exit_code = 10
    code = "busy"
    status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FormatUnavailableError(TtsdError):
    """An audio format whose encoder library is not installed on this box (e.g. aac without PyAV).
    Not the request's fault (the format is valid) nor the model's: the box's, and a lasting one,
    so 501 rather than a 503 that invites retries."""

    exit_code = 3
    code = "format_unavailable"
    status = 501

    @classmethod
    def lacking(cls, fmt: str, needs: str) -> FormatUnavailableError:
        return cls(f"format {fmt} is not available on this box: it needs {needs}")


class ColdVoiceError(BusyError):
    """The voice serves, but the memory budget has unloaded its active version: a front end waits
    for its load (``Backend.lease``); one that cannot wait answers 503 with Retry-After."""

    def __init__(self, voice: str) -> None:
        super().__init__(f"voice {voice} is not loaded", retry_after=2)
        self.voice = voice


class DaemonError(TtsdError):
    """The daemon could not be reached, or answered with an error ``ttsd say`` cannot map."""

    exit_code = 9
    code = "daemon"


class ManifestError(TtsdError):
    """A model folder's ``ttsd.json`` is missing, unreadable or incomplete."""

    exit_code = 5
    code = "bad_manifest"


@dataclass(frozen=True)
class Problem:
    """One way a model folder differs from its manifest. ``kind`` is one of ``missing``,
    ``short`` (smaller than listed: a copy still in progress), ``changed`` (other size or
    bytes), ``extra``, ``unsafe`` (a link or a special file), ``pickle``, ``unreadable``,
    ``too_many``; ``str()`` is the line shown to a user."""

    kind: str
    path: str
    detail: str = ""

    def __str__(self) -> str:
        label = {"short": "changed", "pickle": "pickle weights", "too_many": "too many files"}.get(self.kind, self.kind)
        return f"{label}: {self.path}" + (f" ({self.detail})" if self.detail else "")


class VerifyError(TtsdError):
    """A model folder does not match its manifest (missing, extra, changed or unsafe files)."""

    exit_code = 6
    code = "verify_failed"

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def looks_incomplete(self) -> bool:
        """Whether a copy still in progress would explain every problem: files missing or
        shorter than listed, or hidden temp files (rsync writes ``.name.XXXXXX`` and renames)."""
        return bool(self.problems) and all(
            p.kind in ("missing", "short") or (p.kind == "extra" and p.path.rsplit("/", 1)[-1].startswith("."))
            for p in self.problems
        )


class SignatureError(TtsdError):
    """A model folder's signature is missing, not from a trusted key, or does not cover exactly the
    folder's files (``ttsd.signing``). ``kind`` says which, for the metric and the audit trail."""

    exit_code = 18
    code = "signature_failed"
    PREFIX = "signature: "  # every message starts so: a saved refusal says it was the signature's

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{self.PREFIX}{message}")
        self.kind = kind


class LoadError(TtsdError):
    """A verified model folder could not be loaded or warmed up by its engine: the model's fault
    (a request that waited for that load gets HTTP 500)."""

    exit_code = 7
    code = "load_failed"
    fault = "model"


class SynthesisError(TtsdError):
    """A loaded voice failed on a valid request (exception, NaN or silence): HTTP 500, counted
    against the version."""

    exit_code = 11
    code = "synthesis_failed"
    fault = "model"


class ImportPiperError(TtsdError):
    """A Piper voice could not be converted."""

    exit_code = 8
    code = "import_failed"


class NetworkError(TtsdError):
    """The voice catalog or its mirror cannot be reached (refused, no route, name lookup, timeout,
    a connection cut more often than retried, a 5xx answer). Nothing is blamed on the voice; what
    was downloaded is kept, so the same command resumes."""

    exit_code = 14
    code = "network"


class CatalogError(TtsdError):
    """The voice catalog answered, but not with something usable: a voice it does not list, a
    malformed or oversized ``voices.json``, an entry whose file path escapes the mirror, a file the
    mirror does not have (HTTP 404)."""

    exit_code = 15
    code = "catalog"


class NotOnMirror(CatalogError):
    """The mirror has no such file (HTTP 404 or 410)."""


class ChecksumError(TtsdError):
    """A downloaded file is not the one the catalog describes (other size or md5). The bytes are
    thrown away, so the next try starts over."""

    exit_code = 16
    code = "checksum"


class VoiceExistsError(TtsdError):
    """``ttsd models get`` of a voice the models dir already holds, without ``--upgrade``."""

    exit_code = 17
    code = "voice_exists"


class ResourceError(TtsdError):
    """The box ran out of something (disk space, memory) or an I/O error: not the request's fault
    and not the model's. HTTP 507 for a full disk, else 503; retry later."""

    exit_code = 12
    code = "unavailable"
    status = 503

    def __init__(self, message: str, *, storage: bool = False, retry_after: int = 30) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if storage:
            self.code, self.status = "insufficient_storage", 507


# errno values that mean "the box", not the request or the model
_STORAGE_ERRNOS = {_errno.ENOSPC, _errno.EDQUOT}
_SYSTEM_ERRNOS = _STORAGE_ERRNOS | {_errno.EIO, _errno.EROFS, _errno.ENOMEM, _errno.ENFILE, _errno.EMFILE}


def is_system_oserror(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``OSError`` caused by the box (full disk, I/O error, read-only
    filesystem, out of memory or file handles) rather than by a bad path or bad input."""
    return isinstance(exc, OSError) and exc.errno in _SYSTEM_ERRNOS


def resource_error(exc: BaseException, doing: str) -> ResourceError:
    """A ``ResourceError`` saying what failed while ``doing`` what, for an OSError or MemoryError."""
    if isinstance(exc, MemoryError):
        return ResourceError(f"out of memory while {doing}")
    code = getattr(exc, "errno", None)
    detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return ResourceError(f"{doing} failed: {detail}", storage=code in _STORAGE_ERRNOS)


# what torch, oneDNN and Python say when the box ran out of memory (or of threads): a RuntimeError,
# not a MemoryError, so without this the model was blamed and a good version rolled back
_OUT_OF_MEMORY = (
    "can't allocate memory",
    "defaultcpuallocator",
    "out of memory",
    "bad_alloc",
    "could not create a primitive",
    "can't start new thread",
)


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the box ran out of memory (``MemoryError``, or a library's words)."""
    if isinstance(exc, MemoryError):
        return True
    said = str(exc).lower()
    if "primitive descriptor" in said:  # oneDNN: a shape or setting it cannot run, the model's
        return False
    return isinstance(exc, RuntimeError) and any(words in said for words in _OUT_OF_MEMORY)


def os_error(exc: OSError, doing: str, cannot: str) -> TtsdError:
    """An ``OSError`` as the error a user acts on: the box's (full disk, I/O error: see
    ``is_system_oserror``) is a ``ResourceError`` saying what failed while ``doing`` what (exit
    12, HTTP 503/507); any other (permission, missing dir, ``/proc``) a ``ConfigError`` that says
    what ttsd ``cannot`` do and why (exit 3)."""
    if is_system_oserror(exc):
        return resource_error(exc, doing)
    return ConfigError(f"{cannot}: {exc.strerror or exc}")


def _all_types() -> list[type[TtsdError]]:
    found, stack = [], [TtsdError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def from_http(status: int, code: str, message: str, retry_after: int = 1) -> TtsdError:
    """The error a daemon's JSON error answer stands for, so ``ttsd say`` and the control commands
    exit as if the error had happened in-process: the type whose ``status`` and ``code`` the
    answer carries (the inverse of the attributes above), for the answers the daemon gives on
    purpose (4xx, the model's 500, 503, 507). Any other answer is a ``DaemonError``."""
    if status == 503:
        if code == "unavailable":
            return ResourceError(f"daemon: {message}", retry_after=retry_after)
        return BusyError(f"daemon busy: {message}", retry_after)
    if status == 507:
        return ResourceError(f"daemon: {message}", storage=True, retry_after=retry_after)
    if (status, code) == (FormatUnavailableError.status, FormatUnavailableError.code):  # the daemon's box lacks it
        return FormatUnavailableError(f"daemon: {message}")
    matches = [
        cls
        for cls in _all_types()
        if cls.code == code
        and cls.status == status
        and (status < 500 or cls.fault == "model")
        and cls not in (TtsdError, BusyError, ResourceError)
    ]
    if matches:
        cls = matches[0]
        return cls(f"daemon: {message}" if cls.fault == "model" else message)
    fallback = {
        400: RequestError,
        408: RequestError,
        413: RequestError,
        404: UnknownVoiceError,
        409: ConflictError,
    }.get(status)  # e.g. aiohttp's own 400 for a malformed request
    if fallback is not None:
        return fallback(message)
    return DaemonError(f"daemon answered {status} {code}: {message}")
