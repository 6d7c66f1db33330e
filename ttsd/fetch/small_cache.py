"""A small document from the mirror (a fleet's ``ttsd-index.json``), asked for only if it changed
since the last copy the box kept: cheap polling, for a timer that runs every few minutes on every box.

The last body and the validators it came with (``ETag``, ``Last-Modified``) are kept together in
one private file in the box's private downloads folder, named for the document's URL (so another
mirror's copy is never taken for this one's), written by rename (0600). The next fetch sends them
back (``download.fetch_small_conditional``); a 304 returns the kept body and writes nothing, a 200
rewrites the file only when the body or the validators differ. An unchanged mirror costs one small
request and no disk write.

The kept file is hostile input like the mirror's answers: one that is missing, a link (never
followed), not a regular file, another user's or writable by others, past its bound, for another
URL, or whose body does not match the digest beside it, is ignored, and the fetch is a plain one.
A write that fails (disk full, read-only) is logged and costs only the next poll's 304.

Called from the CLI's thread only; two runs at once each write a whole file and the last one stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CatalogError
from ..fsutil import atomic_write_bytes
from ..safe_read import open_listed
from .download import Mirror, Validators, fetch_small_conditional

log = logging.getLogger("ttsd.fetch")

FORMAT = 1
_HEAD_BYTES = 4096  # the JSON line before the body: format, URL, validators, size, digest


@dataclass(frozen=True)
class _Kept:
    body: bytes
    validators: Validators


def kept_path(cache_dir: Path, url: str) -> Path:
    """Where the last copy of ``url`` is kept in ``cache_dir``."""
    return cache_dir / f".small-{hashlib.sha256(url.encode()).hexdigest()[:32]}"


def _read_bounded(fd: int, size: int) -> bytes:
    data = bytearray()
    while len(data) < size and (chunk := os.read(fd, size - len(data))):
        data += chunk
    return bytes(data)


def _read(path: Path, url: str, limit: int) -> _Kept | None:
    """The copy of ``url`` kept at ``path``, or None when there is none to trust."""
    try:
        fd = open_listed(path)  # never through a link, never a FIFO or a device
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_size > limit + _HEAD_BYTES:
            return None
        data = _read_bounded(fd, st.st_size + 1)  # a file that grows meanwhile is cut off, and refused below
    except OSError:
        return None
    finally:
        os.close(fd)
    head, newline, body = data.partition(b"\n")
    if not newline or len(head) > _HEAD_BYTES or len(body) > limit:
        return None
    try:
        meta = json.loads(head)
    except ValueError:  # UnicodeDecodeError too
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("url") != url:
        return None
    etag, modified = meta.get("etag"), meta.get("last_modified")
    validators = Validators.of(etag, modified)
    if not validators or (validators.etag, validators.last_modified) != (etag, modified):
        return None  # a value that would not be sent as it stands: the file was not written by this code
    if meta.get("size") != len(body) or meta.get("sha256") != hashlib.sha256(body).hexdigest():
        return None
    return _Kept(body, validators)


def _keep(path: Path, url: str, body: bytes, validators: Validators) -> None:
    """Keep ``body`` and ``validators`` at ``path``; with no validators, keep nothing (it could
    never be asked for conditionally) and drop an older copy."""
    try:
        if not validators:
            path.unlink(missing_ok=True)
            return
        meta = {
            "format": FORMAT,
            "url": url,
            "etag": validators.etag,
            "last_modified": validators.last_modified,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, json.dumps(meta, sort_keys=True).encode("ascii") + b"\n" + body)
    except OSError as exc:
        # the document is here all the same; only the next poll costs a whole body
        log.warning("cannot keep %s for the next poll in %s: %s", url, path.parent, exc.strerror or exc)


def fetch_small_cached(mirror: Mirror, rel: str, limit: int, cache_dir: Path) -> tuple[bytes, bool]:
    """(body, changed) of ``rel`` on the mirror, asked for only if it changed since the copy kept
    in ``cache_dir`` (the box's private downloads folder).

    ``changed`` is False when the body is the kept one: the mirror answered 304 (nothing written),
    or 200 with the same bytes (the file rewritten only if the validators changed). The body comes
    back either way, so a caller that checks its own state against the document still can: a 304
    says the mirror is unchanged, not that the last run acted on it. Same bounds, deadline,
    redirect policy and errors as ``download.fetch_small``; a 304 to a request that was not
    conditional (the mirror's mistake: nothing was kept to compare) is a ``CatalogError``."""
    url = mirror.url(rel)
    path = kept_path(cache_dir, url)
    kept = _read(path, url, limit)
    body, validators = fetch_small_conditional(mirror, rel, limit, kept.validators if kept else Validators())
    if body is None:
        if kept is None:  # fetch_small_conditional answers None only to validators we sent
            raise CatalogError(f"{url}: HTTP 304 Not Modified with no copy kept to compare; refused")
        return kept.body, False
    changed = kept is None or body != kept.body
    if kept is None or changed or validators != kept.validators:
        _keep(path, url, body, validators)
    return body, changed
