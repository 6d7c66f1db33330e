"""The spool's files, each from a writer the daemon does not trust: request IDs, names shown in
logs, the name of a request's error file, reading a request file (no links, regular, bounded) and
parsing it."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

from ..errors import SpoolFileError
from .speech_request import SynthRequest, parse_json, parse_request

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a request's ID: its file name without the suffix
MAX_REQUEST_BYTES = 1 << 20  # as for an HTTP body: far more than any allowed text


def is_id(stem: str) -> bool:
    """A request's ID: 1-200 letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit,
    and not ending in ``.error`` (``ID.error.json`` is a failed request's error file)."""
    return ID.fullmatch(stem) is not None and not stem.endswith(".error")


def shown(name: str) -> str:
    """A file name as it may appear in a log line or an error message: control characters
    escaped, cut to a readable length."""
    shown = name.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= 120 else shown[:100] + "…" + shown[-16:]


def error_name(name: str) -> str:
    """``ID.error.json`` for a request file name, within the filesystem's 255 bytes even when the
    name itself is invalid or long (then: a cleaned prefix plus a hash of the name)."""
    path = Path(name)
    if path.suffix in (".txt", ".json") and is_id(path.stem):
        return f"{path.stem}.error.json"
    return f"{hashed_stem(name)}.error.json"


def hashed_stem(name: str) -> str:
    """A short, safe stem for a file name that is no request's: its cleaned prefix and a hash of
    the whole name (two names never share one, nor one with a request's ID)."""
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).stem)[:100].lstrip(".") or "request"
    return f"{clean}-{digest}"


def read_bounded(path: Path) -> bytes:
    """The request's bytes: opened without following a link, a regular file, at most
    ``MAX_REQUEST_BYTES`` (checked before reading)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpoolFileError(
                "bad_file", f"{shown(path.name)} is a symbolic link; spool requests must be regular files"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpoolFileError("bad_file", f"{shown(path.name)} is not a regular file")
        if st.st_nlink != 1:  # a hard link to a file elsewhere: whatever it is, it is not this writer's
            raise SpoolFileError(
                "bad_file",
                f"{shown(path.name)} has other hard links; publish requests by writing a new file and renaming it",
            )
        if st.st_size > MAX_REQUEST_BYTES:
            raise SpoolFileError(
                "too_large", f"{shown(path.name)} is {st.st_size} bytes; the limit is {MAX_REQUEST_BYTES}"
            )
        chunks, left = [], MAX_REQUEST_BYTES + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # it grew after fstat
            raise SpoolFileError("too_large", f"{shown(path.name)} is over {MAX_REQUEST_BYTES} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_file(path: Path, raw: bytes) -> SynthRequest:
    """A request file's bytes -> ``SynthRequest``: ``ID.txt`` is UTF-8 text, ``ID.json`` the fields
    of ``POST /v1/synthesize``, checked as that route checks them (so ``stream`` needs a format that streams);
    a valid ``stream`` is then ignored: the spool writes whole files."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpoolFileError(
            "bad_request", f"{shown(path.name)} is not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    if path.suffix == ".txt":
        return SynthRequest(text=text)
    req = parse_request(parse_json(raw))
    return replace(req, stream=False) if req.stream else req
