"""What serves right now, and the one place requests take a version: the front ends' only view of
serving.

The manager puts a version in the map once it is loaded and warm (``add``), makes it a voice's
active version by replacing one reference (``activate``: TF Serving's fast-read pointer swap; the
old version is never changed under a request), or a canary for a share of requests: of users, when
a request carries a user key (``user_point``), else of requests, drawn at random. A request
``acquire``s a ``Lease``: the frozen facts of the version that serves it (``VoiceVersion``: name,
version, sample rate) and its engine, held until ``release``, so a swap never changes the model
under a running request. Within a memory budget a voice's active version may be *parked*
(``park``): still active, not loaded, so ``acquire`` raises ``ColdVoiceError`` and the front end
waits for its load. The map knows nothing of states, stores or folders: it calls back
``on_release`` (the manager judges the outcome and unloads what is idle) and ``upgrading`` (voices
being loaded, for a 503 rather than a 404).

Threads: ``acquire``/``release`` run on any thread (event loop, synthesis workers); the manager's
calls run on loader threads. Everything takes ``_lock`` briefly; callbacks run outside it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..engines import Engine
from ..errors import BusyError, ColdVoiceError, ConflictError, UnknownVoiceError
from ..shares import point
from ..voices import BUILTIN_VOICE
from .pacing import Guard
from .versions import norm


def default_of(configured: str | None, names: Iterable[str]) -> str | None:
    """The voice for requests that name none, of ``names`` (the voices serving): ``--default-voice``
    where it serves, else the built-in voice where it serves, else the first name in sort order.
    A voice added beside the built-in one does not take its place because its name sorts first."""
    names = set(names)
    for choice in (configured, BUILTIN_VOICE):
        if choice and choice in names:
            return choice
    return min(names) if names else None


def shown_name(name: str) -> str:
    """A voice name from a request, cut for an error message (a 1 MB name was echoed whole)."""
    return name if len(name) <= 100 else f"{name[:100]}…"


log = logging.getLogger("ttsd.serving")

Key = tuple[str, str]  # (voice, normalised version)


def user_point(canary: Key, user: str) -> float:
    """Where ``user`` stands for ``canary`` (voice, version): a point in [0, 1), the same for every
    request of that user, on any box and after restarts. The user is on the canary when the point
    is below the share, so a larger share keeps everyone who was on it; each new canary picks its
    own users (``ttsd.shares``, the rule a fleet's staged rollout uses for boxes too)."""
    return point(canary[0], canary[1], user)


@dataclass(frozen=True)
class VoiceVersion:
    """The version serving a request, as a front end may know it."""

    name: str
    version: str
    sample_rate: int


@dataclass
class _Entry:
    """One loaded version in the map; a lease counts against this very object (not its key, which
    may be in the map again, as a new entry, by the time the lease ends)."""

    key: Key
    voice: VoiceVersion
    engine: Engine[Any]
    in_flight: int = 0
    cut: bool = False  # unloaded while requests held it (``remove(force=True)``)


@dataclass
class Lease:
    """A request's hold on one loaded version. ``release(ok)`` exactly once: ``ok`` is whether the
    model did its job (None: the request failed for its own reasons or the box's, e.g. bad text)."""

    voice: VoiceVersion
    engine: Engine[Any]
    _release: Callable[[_Entry, bool | None], None] = field(repr=False)
    _entry: _Entry = field(repr=False)
    _released: bool = field(default=False, repr=False)
    # the client named the version ("version", X-Ttsd-Version): its successes do not judge it (20
    # pinned requests promoted a 1 % canary); its failures still do
    pinned: bool = False

    def release(self, ok: bool | None = None) -> None:
        if not self._released:
            self._released = True
            self._release(self._entry, None if ok and self.pinned else ok)

    @property
    def cut(self) -> bool:
        """Whether its version was unloaded under the request (the memory policy's upgrade once
        its wait was over, a shutdown): the daemon's doing, never counted against the model."""
        return self._entry.cut

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class ServingMap:
    def __init__(
        self,
        *,
        on_release: Callable[[Key, bool | None], None] = lambda _k, _ok: None,
        upgrading: Callable[[], set[str]] = set,
        canary_share: Callable[[str], float] = lambda _n: 0.0,
        default_voice: str | None = None,
    ) -> None:
        self._on_release = on_release
        self._upgrading = upgrading
        self._canary_share = canary_share
        self.default_voice = default_voice
        self._lock = Guard()
        self._loaded: dict[Key, _Entry] = {}  # every loaded version a request may name
        self._active: dict[str, Key] = {}
        self._canary: dict[str, Key] = {}
        self._in_flight = 0
        self._said_default: str | None = None  # the default voice the log last named
        self._announcing = False  # the default is logged from ``announce_default`` (after start-up) on
        self._swapping_out: set[str] = set()  # voices taken out of service for an upgrade (``deactivate``)
        self._leaving: set[str] = set()  # voices being removed (``drop_voice``)

    # -- requests (any thread) -------------------------------------------------------------------
    def acquire(self, voice: str | None = None, version: str | None = None, *, user: str | None = None) -> Lease:
        """A lease on ``voice``'s active version (or its canary, for the canary's share of users
        when ``user`` is given, else of requests), or on ``version`` of it when named (a pinned
        version wins over the canary). ``BusyError`` while nothing serves yet or the voice is being
        upgraded; ``UnknownVoiceError`` for a voice or version not loaded."""
        decided: tuple[str, float] | None = None  # logged outside the lock
        with self._lock:
            name = voice or self._default_name()
            if name is None:
                raise BusyError("no voice is ready yet", retry_after=5)
            if name in self._leaving:
                raise UnknownVoiceError(f"voice {name!r} is being removed")
            if version is not None:
                key = (name, norm(version))
                if key not in self._loaded:
                    if self._active.get(name) == key:
                        raise ColdVoiceError(name)
                    raise UnknownVoiceError(f"voice {name} has no loaded version {version}")
            else:
                active = self._active.get(name)
                if active is None:
                    if name in self._upgrading():
                        raise BusyError(f"voice {name} is being upgraded", retry_after=2)
                    known = ", ".join(sorted(self._active)) or "none"
                    raise UnknownVoiceError(f"unknown voice {shown_name(name)!r} (voices: {known})")
                key = active
                canary = self._canary.get(name)
                if canary is not None:
                    share = self._canary_share(name)
                    point = random.random() if user is None else user_point(canary, user)
                    if point < share:
                        key = canary
                    if user is not None:
                        decided = (key[1], share)
            entry = self._loaded.get(key)
            if entry is None:  # its active version is parked (the memory budget's): load it first
                raise ColdVoiceError(name)
            entry.in_flight += 1
            self._in_flight += 1
            lease = Lease(entry.voice, entry.engine, self._release, entry, pinned=version is not None)
        if decided is not None:  # a user key is personal data: never a metric label, debug logs only
            log.debug("user %r: %s %s (canary share %.0f%%)", user, name, decided[0], decided[1] * 100)
        return lease

    def judge(self, voice: str, version: str, ok: bool) -> None:
        """The outcome of a request that held no lease to its end (a Wyoming text stream, whose
        sentences each held one and counted nothing): judged as a lease's release would be."""
        self._on_release((voice, norm(version)), ok)

    def _release(self, entry: _Entry, ok: bool | None) -> None:
        with self._lock:
            entry.in_flight -= 1
            self._in_flight -= 1
        self._on_release(entry.key, None if entry.cut else ok)

    def _default_name(self) -> str | None:
        names = set(self._active)
        if self._swapping_out:  # still the default while its upgrade loads: "being upgraded", not another voice
            names |= self._swapping_out & self._upgrading()
        return default_of(self.default_voice, names)

    def _say_default(self) -> None:
        """Log which voice requests that name none get, when it changes (a voice added whose name
        sorts first on a box without the built-in voice, the default voice gone)."""
        now = self._default_name()
        if not self._announcing or now is None or now == self._said_default:
            return
        if now == self.default_voice:
            how = "--default-voice"
        else:
            given = f"--default-voice {self.default_voice} does not serve" if self.default_voice else None
            why = "the built-in voice" if now == BUILTIN_VOICE else "the first voice by name"
            how = f"{why}; {given or '--default-voice chooses another'}"
        log.info("requests that name no voice get %s (%s)", now, how)
        self._said_default = now

    def announce_default(self) -> None:
        """Log the default voice now (start-up is done), and from now on whenever it changes."""
        with self._lock:
            self._announcing = True
            self._say_default()

    # -- what serves (any thread) ------------------------------------------------------------------
    def ready(self) -> bool:
        return bool(self._active)

    def serving(self) -> bool:
        """Whether any request is being served right now (read without the lock)."""
        return self._in_flight > 0

    def in_flight(self, key: Key) -> int:
        with self._lock:
            entry = self._loaded.get(key)
            return entry.in_flight if entry else 0

    def active(self, name: str) -> Key | None:
        return self._active.get(name)

    def canary(self, name: str) -> Key | None:
        return self._canary.get(name)

    def default_name(self) -> str | None:
        with self._lock:
            return self._default_name()

    # -- the manager's side (loader threads) -------------------------------------------------------
    def add(self, key: Key, voice: VoiceVersion, engine: Engine[Any]) -> None:
        """``key`` is loaded and warm: requests may name it from now on."""
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = _Entry(key, voice, engine)

    def activate(self, key: Key) -> Key | None:
        """The swap: ``key`` serves its voice's new requests from now on (and stops being its
        canary). Returns the version it replaced."""
        with self._lock:
            assert key in self._loaded, key
            name = key[0]
            if name in self._leaving:  # (the operator's actions check first, under the commit lock)
                raise ConflictError(f"voice {name} is being removed")
            previous = self._active.get(name)
            self._active[name] = key
            self._swapping_out.discard(name)
            if self._canary.get(name) == key:
                del self._canary[name]
            self._say_default()
            return previous

    def set_canary(self, key: Key) -> None:
        with self._lock:
            assert key in self._loaded, key
            if key[0] in self._leaving:
                raise ConflictError(f"voice {key[0]} is being removed")
            self._canary[key[0]] = key

    def end_canary(self, name: str) -> None:
        with self._lock:
            self._canary.pop(name, None)

    def deactivate(self, name: str) -> Key | None:
        """Take ``name``'s active version out of service (the memory policy, before its successor
        loads). Requests for the voice get "being upgraded" until one is activated."""
        with self._lock:
            self._swapping_out.add(name)
            return self._active.pop(name, None)

    def remove(self, key: Key, *, force: bool = False) -> bool:
        """Take ``key`` out of the map so it can be unloaded. False while a request still holds
        it (then its last ``release`` calls back, and the manager tries again); ``force``
        (shutdown) takes it out anyway. True when it is not in the map (any more)."""
        with self._lock:
            entry = self._loaded.get(key)
            if entry is None:
                return True
            if entry.in_flight and not force:
                return False
            entry.cut = entry.in_flight > 0
            if self._active.get(key[0]) == key:
                del self._active[key[0]]
            if self._canary.get(key[0]) == key:
                del self._canary[key[0]]
            del self._loaded[key]
            self._say_default()
            return True

    def drop_voice(self, name: str) -> None:
        """Voice ``name`` leaves service (``ttsd models remove``): from now on requests naming it,
        or any version of it, get ``UnknownVoiceError``, and none of its versions is made active,
        a canary or parked. Requests holding it go on; its versions stay in the map until they
        are unloaded (``remove``), as a retired version does. ``forget_voice`` ends it."""
        with self._lock:
            self._leaving.add(name)
            self._active.pop(name, None)
            self._canary.pop(name, None)
            self._swapping_out.discard(name)
            self._say_default()

    def leaving(self, name: str) -> bool:
        """Whether ``name`` is being removed (``drop_voice``)."""
        return name in self._leaving

    def forget_voice(self, name: str) -> None:
        """The removal of ``name`` is over: it is a name like any other again (a folder of it
        dropped in later is a new voice)."""
        with self._lock:
            self._leaving.discard(name)

    def park(self, key: Key) -> bool:
        """``key`` stays (or becomes) its voice's active version, but not loaded: its entry leaves
        the map and requests for the voice get ``ColdVoiceError`` until ``add`` puts it back (the
        memory budget's unload, and a voice restored without loading). False, and nothing
        changes, while a request holds it."""
        with self._lock:
            entry = self._loaded.get(key)
            if entry is not None and entry.in_flight:
                return False
            self._loaded.pop(key, None)
            if key[0] in self._leaving:  # unloaded, but not its voice's active version any more
                return True
            self._active[key[0]] = key
            self._say_default()
            return True

    def loaded(self, key: Key) -> bool:
        return key in self._loaded

    def clear(self) -> list[Engine[Any]]:
        """Everything out (shutdown): the engines, for the owner to unload."""
        with self._lock:
            engines = [e.engine for e in self._loaded.values()]
            self._loaded.clear()
            self._active.clear()
            self._canary.clear()
            return engines
