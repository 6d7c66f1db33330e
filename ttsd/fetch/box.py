"""This box's identity in a fleet: what a staged rollout picks boxes by (``ttsd.shares``: sha256
of voice, version and box id), and what ``ttsd serve`` exports as ``ttsd_box_info``.

Where it comes from, first found wins:

1. ``--box-id`` / ``TTSD_BOX_ID``, used as given once checked (``check_box_id``);
2. the machine id (``/etc/machine-id``, else ``/var/lib/dbus/machine-id``), never as it is:
   machine-id(5) asks that it not be exposed, and that an application derive its own id with a
   keyed hash under a fixed key of its own. This is systemd's ``sd_id128_get_machine_app_specific``
   (HMAC-SHA256 keyed by the machine id over ``APP_ID``), so on a box
   ``systemd-id128 machine-id --app-specific=APP_ID | cut -c1-16`` prints the same id;
3. a random id made once and kept in ``KEEP_FILE`` in the given dir (the daemon's state dir;
   ``get``'s cache dir), for boxes without a machine id (containers, most often).

The kept file is outside input like any other: a link, a special file, an oversized or malformed
one is not trusted (a warning says why) and a new id replaces it; the link itself is replaced,
never written through. Plain I/O and the standard library only: ``get`` runs from a timer.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import atomic_write_text

log = logging.getLogger("ttsd.box")

KEEP_FILE = "box-id"  # in the dir given as keep_in
MACHINE_IDS = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
# ttsd's fixed application key for the machine id (made once with `systemd-id128 new`); changing
# it changes every box's id, and so which boxes each staged version goes to
APP_ID = "2bdef1c9c1174b4da7f6654b29e07ca1"
ID_DIGITS = 16  # hex digits of a derived or random id: 64 bits (60 for a derived one, see below)

_VALID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MACHINE_ID = re.compile(r"[0-9a-fA-F]{32}")
_MAX_READ = 128  # bytes read of a machine id or a kept file: either is far shorter
_READ_KEPT = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def check_box_id(value: str, what: str = "--box-id") -> str:
    """``value`` if it is a box id (1 to 64 ASCII letters, digits, ``-``, ``_`` or ``.``: it goes
    into a metric label and a hash, and may be typed in a unit file), else a ``ConfigError``
    naming ``what``. Called by the CLI before anything starts, and by ``box_id``."""
    if not _VALID.fullmatch(value):
        raise ConfigError(f"{what} {value!r}: a box id is 1 to 64 letters, digits, '-', '_' or '.'")
    return value


def box_id(explicit: str | None, *, keep_in: Path, machine_ids: Sequence[Path] = MACHINE_IDS) -> str:
    """This box's id: ``explicit`` (checked) when given, else derived from the first usable
    machine id in ``machine_ids``, else the id kept in ``keep_in/KEEP_FILE`` (made and kept
    there, mode 0600, the first time). The same on every call on one box unless its machine id,
    the kept file or ``explicit`` changes.

    Blocks on small reads, and on an fsync when an id is made; call it once at start. A
    ``ConfigError`` when ``explicit`` is not a box id, or when an id would have to be made but
    cannot be kept (the id would then change at every start: give ``--box-id`` instead)."""
    if explicit is not None:
        return check_box_id(explicit)
    for path in machine_ids:
        if (machine := _machine_id(path)) is not None:
            log.debug("box id derived from %s", path)
            return _app_specific(machine)[:ID_DIGITS]
    return _kept(Path(keep_in) / KEEP_FILE)


def _machine_id(path: Path) -> bytes | None:
    """The 16 bytes of the machine id in ``path``, or None when it is missing or not one (an empty
    file in an image not booted yet, ``uninitialized`` during a first boot, all zeros). Links are
    followed: ``/var/lib/dbus/machine-id`` is often one to ``/etc/machine-id``, and both are root's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, _MAX_READ).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    if not _MACHINE_ID.fullmatch(text) or not text.strip("0"):
        return None
    return bytes.fromhex(text)


def _app_specific(machine: bytes) -> str:
    """systemd's ``sd_id128_get_machine_app_specific``: HMAC-SHA256 keyed by the machine id over
    ``APP_ID``, its first 16 bytes marked as a version 4 UUID (which fixes hex digit 13 to 4: a
    derived id has 60 bits of its own), as 32 hex digits. Nothing of the machine id can be read
    back from it, and other applications' ids from the same machine id are unrelated to it."""
    digest = bytearray(hmac.new(machine, bytes.fromhex(APP_ID), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return digest.hex()


def _kept(path: Path) -> str:
    """The id kept in ``path``; a new one made and kept there when there is none, or when the
    file cannot be trusted (then replaced, by rename: a link is replaced, never followed)."""
    kept, distrust = _read_kept(path)
    if kept is not None:
        log.debug("box id kept in %s", path)
        return kept
    new = secrets.token_hex(ID_DIGITS // 2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if distrust is None:
            # a first id: of two processes making one at once (two voices' timers), the first
            # to publish wins and the other takes its id, so the box has one id from the start
            try:
                atomic_write_text(path, new + "\n", exclusive=True)
            except FileExistsError:
                kept, distrust = _read_kept(path)
                if kept is not None:
                    return kept
                atomic_write_text(path, new + "\n")
        else:
            log.warning("box id file %s is not trusted (%s): replacing it with a new id", path, distrust)
            atomic_write_text(path, new + "\n")
    except OSError as exc:
        raise ConfigError(
            f"cannot keep a box id in {path}: {exc.strerror or exc}; give one with --box-id (TTSD_BOX_ID)"
        ) from exc
    log.info("this box has no machine id: made box id %s, kept in %s", new, path)
    return new


def _read_kept(path: Path) -> tuple[str | None, str | None]:
    """(the id in ``path``, None), or (None, why it is not trusted), or (None, None) when there
    is no file. Opened without following a link, checked to be a regular file before reading,
    read no further than ``_MAX_READ`` bytes. An error reading a file that may be fine is a
    ``ConfigError``: replacing it would change the box's id."""
    try:
        fd = os.open(path, _READ_KEPT)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "a symbolic link"
        if exc.errno == errno.ENXIO:  # a socket
            return None, "not a regular file"
        raise ConfigError(f"cannot read the box id in {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > _MAX_READ:
            return None, f"{info.st_size} bytes, not an id"
        data = os.read(fd, _MAX_READ + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the box id in {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, "not ASCII text"
    if len(data) > _MAX_READ or not _VALID.fullmatch(text):
        return None, "not a box id"
    return text, None
