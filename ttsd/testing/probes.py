"""What tests and benches measure a daemon with: polling until something holds (``wait_for``),
percentiles (``pct``), a process's memory from ``/proc`` (``rss_mb``), and one HTTP request on a
fresh Unix-socket connection (``request``), as a client that connects per request does. Standard
library only."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from ..client import UnixHTTPConnection


class WaitTimeout(TimeoutError):
    """:func:`wait_for` gave up; the message names what it waited for, so a failure says which step hung."""


def wait_for(
    predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition", interval: float = 0.1
) -> float:
    """Poll ``predicate()`` every ``interval`` seconds until it is true; the seconds that took.

    Polling, not sleeping a fixed time: a daemon's steps take what the machine gives them, so a
    test waits exactly as long as needed and a bench can time the step. Raises :class:`WaitTimeout`
    naming ``what`` after ``timeout`` seconds; an exception from ``predicate`` (e.g. "the daemon
    exited") ends the wait at once.
    """
    started = time.monotonic()
    deadline = started + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def pct(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..100; NaN for no values.

    Nearest rank rather than interpolation: the answer is a latency that was actually measured,
    and p99 of fewer than 100 samples is their maximum rather than an invented value. NaN rather
    than an error, so that an empty class of requests (no cache misses, say) still prints a row.
    """
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered), math.ceil(q / 100 * len(ordered))) - 1)]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of ``/proc/PID/status`` in MB: ``VmRSS`` (resident now) or ``VmHWM`` (peak).

    Read from ``/proc`` rather than asked of the daemon, so it measures the process from outside,
    the way an operator's ``top`` does, and works while the daemon is busy. Raises
    ``FileNotFoundError`` when the process is gone and ``LookupError`` for a field it lacks (a
    zombie has no memory fields).
    """
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise LookupError(f"no {field} in /proc/{pid}/status (has the process exited?)")


class Reply(NamedTuple):
    """One answer. A tuple, so ``status, headers, body = request(...)`` works as well as ``reply.status``."""

    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    sock: str | os.PathLike[str],
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Reply:
    """One request on a fresh connection to the Unix socket ``sock``.

    ``body`` is sent as JSON (with ``Content-Type: application/json`` unless ``headers`` say
    otherwise); ``raw`` as given, for malformed or non-JSON bodies. A fresh connection each time,
    as ``ttsd say`` and most clients do, so connection reuse never hides a per-connection cost.
    Connection errors propagate (``OSError``, ``http.client.HTTPException``): whether "no answer"
    is a failure is the caller's call.
    """
    sent = dict(headers or {})
    payload = raw
    if payload is None and body is not None:
        payload = json.dumps(body).encode()
        if not any(name.lower() == "content-type" for name in sent):
            sent["Content-Type"] = "application/json"
    conn = UnixHTTPConnection(sock, timeout)
    try:
        conn.request(method, path, body=payload, headers=sent)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
