"""Where ttsd keeps things, resolved once from flags, ``TTSD_*`` variables and platform defaults.

Plain data: the CLI builds a ``Paths`` and passes it down; nothing reads the environment later.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP = "ttsd"
KERNEL_CACHE = "kernels.json"  # in the cache dir: the kernel paths measured on this box (engines/vits/kernels.py)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _pick(env: str, as_root: Path, as_user: Callable[[], Path]) -> Path:
    """``$env`` if set, else the system path when running as root, else the per-user path."""
    if value := os.environ.get(env):
        return Path(value)
    return as_root if _is_root() else as_user()


def default_models_dir() -> Path:
    """``/models`` on a box (running as root, or when it exists), else the user's data dir."""
    models = Path("/models")
    return _pick(
        "TTSD_MODELS", models, lambda: models if models.is_dir() else Path(platformdirs.user_data_dir(APP)) / "models"
    )


def default_cache_dir() -> Path:
    """Derived files ttsd can rebuild (the converted built-in voice)."""
    return _pick("TTSD_CACHE", Path("/var/cache/ttsd"), lambda: Path(platformdirs.user_cache_dir(APP)))


def default_state_dir() -> Path:
    return _pick("TTSD_STATE", Path("/var/lib/ttsd"), lambda: Path(platformdirs.user_state_dir(APP)))


def default_socket() -> Path:
    """``/run/ttsd/ttsd.sock`` as root, else under ``$XDG_RUNTIME_DIR`` (or the user runtime dir)."""

    def user() -> Path:
        if xdg := os.environ.get("XDG_RUNTIME_DIR"):
            return Path(xdg) / APP / "ttsd.sock"
        import warnings

        with warnings.catch_warnings():  # platformdirs warns of the fall-back on every start (a
            warnings.simplefilter("ignore")  # system user under systemd has no XDG_RUNTIME_DIR)
            return Path(platformdirs.user_runtime_dir(APP)) / "ttsd.sock"

    return _pick("TTSD_SOCKET", Path("/run/ttsd/ttsd.sock"), user)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost`` or a loopback address)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


AUDIO_SECONDS_PER_CHAR = 0.12  # default --max-audio-seconds per --max-chars character (see the CLI)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``ttsd serve`` needs, resolved and checked by the CLI."""

    models: Path
    state: Path
    cache: Path
    socket: Path
    spool: Path | None = None
    spool_keep_days: float = 7.0  # answers leave out/, done/, failed/ after this long (0: kept for ever)
    listen: tuple[str, int] | None = None
    metrics_listen: tuple[str, int] | None = None  # /metrics alone, no token (Prometheus)
    token: str | None = None
    socket_group: str | None = None
    workers: int = 1
    threads: int | None = None
    precision: str = "auto"  # auto | fp32 | bf16: see ttsd.engines.precision
    queue_size: int = 16
    max_chars: int = 5000
    max_audio_seconds: float = 600.0
    max_connections: int = 128  # per listener
    idle_timeout: float = 15.0  # seconds to send a whole request after connecting or an answer
    write_timeout: float = 60.0  # seconds a client may leave its answer unread (HTTP and Wyoming)
    grace: float = 30.0
    default_voice: str | None = None
    seed_builtin: bool = True
    keep: int = 1
    swap_policy: str = "availability"
    canary: tuple[tuple[str, float], ...] = ()  # (voice or "*", share)
    canary_requests: int = 20
    auto_rollback_requests: int = 20
    auto_rollback_share: float = 0.25
    settle: float = 1.0
    incomplete_timeout: float = 60.0
    rescan_interval: float = 5.0
    wyoming: str | None = None  # tcp://HOST:PORT or unix://PATH
    wyoming_zeroconf: str | None = None  # announce the Wyoming TCP service over mDNS under this name
    trusted_keys: Path | None = None  # load only folders signed by a public key in this dir
    max_loaded: int | None = None  # loaded versions at most (None: no limit)
    memory_budget: int | None = None  # bytes of the process's RSS (None: no limit)
    preload: tuple[str, ...] = ()  # voices kept loaded within a budget (empty: the default voice)
    load_wait: float = 30.0  # seconds a request waits for its voice to load
    box_id: str | None = None  # --box-id, checked; None: derived or kept at start (ttsd.fetch.box)


@dataclass(frozen=True)
class Paths:
    models: Path
    cache: Path

    @classmethod
    def resolve(cls, models: Path | None = None, cache: Path | None = None) -> Paths:
        return cls(
            models=Path(models) if models else default_models_dir(), cache=Path(cache) if cache else default_cache_dir()
        )
