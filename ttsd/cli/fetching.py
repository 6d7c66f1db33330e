"""``ttsd models search / get / publish``: voices from the Piper catalog or a fleet mirror, and
publishing signed folders to a mirror. The commands join the ``models`` group of
``ttsd.cli.models``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from .common import FiniteRange, box_id_value, console, daemon_client, trusted_keys_option, version_value
from .models import models

MIRROR_HELP = (
    "HTTP(S) server with the layout of the Piper voices repository [env TTSD_MIRROR; default: "
    "Hugging Face rhasspy/piper-voices]."
)
TIMEOUT_HELP = "Seconds to wait for the mirror to connect, and for each read."


@models.command("search")
@click.argument("text", nargs=-1)
@click.option("--language", "-l", help="Language code (en_US, en-us) or family (en).")
@click.option("--json", "as_json", is_flag=True, help="Print the matching catalog entries as JSON.")
@click.option("--mirror", envvar="TTSD_MIRROR", help=MIRROR_HELP)
@click.option("--timeout", type=FiniteRange(min=0.1), default=30.0, show_default=True, help=TIMEOUT_HELP)
def search_cmd(text: tuple[str, ...], language: str | None, as_json: bool, mirror: str | None, timeout: float) -> None:
    """Voices of the mirror whose key, language or quality hold every word of TEXT: a fleet
    mirror's ready folders (its ttsd-index.json), else the Piper catalog (voices.json)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..errors import CatalogError, NotOnMirror
    from ..fetch.download import Mirror
    from ..fetch.get import load_catalog
    from ..fetch.prebuilt import INDEX_FILE, load_index

    source = Mirror.parse(mirror, timeout)
    out = console()
    with out.status(f"reading the catalog at {source.base}…"):
        try:
            index = load_index(source)
        except NotOnMirror:
            index = None
        if index is None:
            try:
                catalog = load_catalog(source)
            except NotOnMirror:
                raise CatalogError(
                    f"{source.base} has neither {INDEX_FILE} (a fleet mirror made by 'ttsd models publish') "
                    "nor voices.json (a Piper catalog)"
                ) from None
    if index is not None:
        _list_fleet(index, text, language, as_json, source.base)
        return
    found = catalog.search(" ".join(text), language)
    if catalog.invalid:
        key, why = next(iter(catalog.invalid.items()))
        # the key as the mirror wrote it may hold terminal escapes or bidi characters: escaped
        out.print(f"warning: {len(catalog.invalid)} catalog entries refused, e.g. {key!a}: {why}", markup=False)
    if as_json:  # (the hint of an empty result on stderr, as the table's: stdout stays JSON)
        click.echo(json.dumps([voice.to_json() for voice in found], indent=2, ensure_ascii=False))
        if not found:
            out.print(_no_match(text, language), markup=False)
        return
    # cells are the catalog's text (rid of control and bidi characters when parsed), never markup:
    # a name such as '[/x]' would otherwise be read as a rich tag, or fail to parse as one
    table = Table(
        "voice",
        "language",
        "quality",
        "speakers",
        "size",
        title=Text(f"{len(found)} of {len(catalog.voices)} voices at {source.base}"),
    )
    for voice in found:
        lang = voice.language
        table.add_row(
            Text(voice.key),
            Text(f"{lang.code} ({lang.name_english}, {lang.country_english})"),
            Text(voice.quality),
            str(voice.num_speakers),
            f"{voice.size / 1e6:.1f} MB",
        )
    Console().print(table)
    if not found:
        out.print(_no_match(text, language), markup=False)


def _list_fleet(index: dict[str, Any], text: tuple[str, ...], language: str | None, as_json: bool, base: str) -> None:
    """A fleet mirror's voices, a row per published version: its share of boxes, whether it is
    withdrawn (and why), and whether its folder is signed (the index records a signature, not its
    signer: who signed it is checked by 'get --trusted-keys'). Words match the name; a language
    (``en_US``, ``en-us``, ``en``) matches a Piper-style name's code (``en_US-joe-medium``) or its
    family."""
    from packaging.version import Version
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    words = [w.lower() for w in text]
    wanted = (language or "").replace("-", "_").lower()

    def in_language(name: str) -> bool:
        code = name.split("-", 1)[0].lower()
        return not wanted or wanted in (code, code.split("_", 1)[0])

    found = [
        voice for name, voice in sorted(index.items()) if all(w in name.lower() for w in words) and in_language(name)
    ]
    rows = []
    for voice in found:
        listed = [
            {
                "name": voice.name,
                "version": p.version,
                "path": p.path,
                "share": p.share,
                "withdrawn": None,
                "signed": p.signature is not None,
            }
            for p in voice.versions
        ] + [
            {"name": voice.name, "version": v, "path": None, "share": 0.0, "withdrawn": why, "signed": None}
            for v, why in voice.withdrawn.items()
        ]
        rows += sorted(listed, key=lambda r: Version(r["version"]), reverse=True)
    if as_json:  # (the hint of an empty result on stderr, as the table's: stdout stays JSON)
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        title = Text(f"{len(found)} of {len(index)} voices on the fleet mirror {base}")
        table = Table("voice", "version", "boxes", "signed", title=title)
        for row in rows:
            boxes = f"withdrawn: {row['withdrawn']}" if row["withdrawn"] else f"{row['share']:.0%}"
            signed = "" if row["signed"] is None else ("yes" if row["signed"] else "no")
            table.add_row(Text(row["name"]), Text(row["version"]), Text(boxes), signed)
        Console().print(table)
    if not found:
        console().print(
            _no_match(text, language, " (a fleet voice has a language only in a Piper-style name, ll_CC-...)"),
            markup=False,
        )


def _no_match(text: tuple[str, ...], language: str | None, about_language: str = "") -> str:
    """What to try when nothing matched: without the words, or without --language, whichever
    was given."""
    dropped = [what for what, given in (("words", text), ("--language", language)) if given]
    if not dropped:
        return "no voice matches"
    hint = about_language if language else ""
    return f"no voice matches; without {' and '.join(dropped)} 'ttsd models search' lists them all{hint}"


def _check_voice_arg(voice: str) -> None:
    """A voice to get is a Piper catalog key or a fleet voice's name; one that is neither (a
    separator, a bidi override, a space) is refused as the catalog's key check refuses it."""
    from ..errors import CatalogError, ManifestError
    from ..fetch.index import check_voice_key
    from ..manifest import check_name

    try:
        check_voice_key(voice)
    except CatalogError as refused:
        try:
            check_name(voice)
        except ManifestError:
            raise refused from None


class _RichReporter:
    """``get``'s stages as lines and each download as a progress bar, on stderr."""

    def __init__(self) -> None:
        self.out = console()

    def step(self, message: str) -> None:
        self.out.print(f"{message}…", markup=False)

    @contextmanager
    def transfer(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.out) as bar:
            task = bar.add_task(name, total=total)
            yield lambda done: bar.update(task, completed=done)


SHARE = FiniteRange(0.0, 1.0)
sign_index_option = click.option(
    "--sign-key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TTSD_SIGN_KEY",
    help="The fleet's private key (PEM) to sign the index with: boxes with --trusted-keys take shares "
    "and withdrawals only from a signed index [env TTSD_SIGN_KEY; a password from TTSD_SIGN_KEY_PASSWORD].",
)


@models.command("publish")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("mirror_dir", type=click.Path(file_okay=False, path_type=Path))
@trusted_keys_option("Refuse to publish a folder not signed by one of these keys.")
@click.option(
    "--rollout",
    "share",
    type=SHARE,
    metavar="SHARE",
    help="Share of boxes (0 to 1) that take this version [default: 1 for a new version; "
    "a version published before keeps its share].",
)
@sign_index_option
def publish_cmd(
    folder: Path, mirror_dir: Path, trusted_keys: Path | None, share: float | None, sign_key: Path | None
) -> None:
    """Put a model folder on a fleet mirror (MIRROR_DIR, served by any HTTP server) as its voice's
    newest version, for boxes to take with 'ttsd models get VOICE --mirror URL'."""
    from ..fetch.prebuilt import publish

    trust = None
    if trusted_keys is not None:
        from ..signing import TrustedKeys

        trust = TrustedKeys.load(trusted_keys)
    mirror_dir.mkdir(parents=True, exist_ok=True)
    entry = publish(folder, mirror_dir, trust, share, sign_key)
    console().print(
        f"{mirror_dir}/{entry.path}: {entry.name} {entry.version}"
        + (", signed" if entry.signature else ", unsigned")
        + f", to {entry.share:.0%} of boxes",
        markup=False,
    )


@models.command("rollout")
@click.argument("mirror_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("voice")
@click.argument("version")
@click.argument("share", type=SHARE)
@sign_index_option
def rollout_cmd(mirror_dir: Path, voice: str, version: str, share: float, sign_key: Path | None) -> None:
    """Give a published VERSION of VOICE to SHARE (0 to 1) of the boxes: widen it (a box that had
    it keeps it), hold it, or narrow it (boxes that have it keep it; to take it back, withdraw)."""
    from ..fetch.prebuilt import rollout

    entry = rollout(mirror_dir, voice, version, share, sign_key)
    console().print(f"{entry.name} {entry.version}: to {entry.share:.0%} of boxes", markup=False)


@models.command("withdraw")
@click.argument("mirror_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("voice")
@click.argument("version")
@click.option("--reason", help="Why, for the boxes' logs and audit trail [default: withdrawn by the fleet mirror].")
@sign_index_option
def withdraw_cmd(mirror_dir: Path, voice: str, version: str, reason: str | None, sign_key: Path | None) -> None:
    """Withdraw a published VERSION of VOICE: no box takes it, and each box that has it goes back to
    the newest version it may have at its next 'ttsd models get --upgrade' (its files stay on the
    mirror)."""
    from ..fetch.prebuilt import withdraw

    fleet = withdraw(mirror_dir, voice, version, reason or "withdrawn", sign_key)
    newest = fleet.newest()
    console().print(
        f"{voice} {version} withdrawn; "
        + (
            f"boxes go back to the newest version they may have (newest: {newest.version})"
            if newest
            else "no other version is published: boxes that have it keep serving it until one is"
        ),
        markup=False,
    )


@models.command("get")
@click.argument("voice")
@click.option(
    "--version",
    "version",
    callback=version_value,
    help="PEP 440 version of the new folder [default: 1, or with --upgrade the next major version].",
)
@click.option(
    "--upgrade",
    is_flag=True,
    help="Add a new version of a voice that is already in the models dir "
    "(nothing is done if its newest version came from the same catalog files).",
)
@click.option("--mirror", envvar="TTSD_MIRROR", help=MIRROR_HELP)
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_MODELS",
    help="Models directory [env TTSD_MODELS].",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_CACHE",
    help="Partial downloads wait in CACHE/downloads [env TTSD_CACHE].",
)
@click.option("--timeout", type=FiniteRange(min=0.1), default=30.0, show_default=True, help=TIMEOUT_HELP)
@trusted_keys_option(
    "A ready folder from a fleet mirror must be signed by one of these "
    "public keys before it is published [env TTSD_TRUSTED_KEYS]."
)
@click.option(
    "--box-id",
    envvar="TTSD_BOX_ID",
    callback=box_id_value,
    help="This box's id, which a fleet mirror's staged rollout picks boxes by [env TTSD_BOX_ID; "
    "default: derived from /etc/machine-id, hashed, else a random id kept in the cache dir].",
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    envvar="TTSD_SOCKET",
    help="The daemon's socket, told to roll back a version the fleet mirror withdrew [env TTSD_SOCKET].",
)
def get_cmd(
    voice: str,
    version: str | None,
    upgrade: bool,
    mirror: str | None,
    models_dir: Path | None,
    cache: Path | None,
    timeout: float,
    trusted_keys: Path | None,
    box_id: str | None,
    socket_path: Path | None,
) -> None:
    """Download a voice of the Piper catalog, check it, convert it and publish it in the models dir.

    An interrupted download goes on where it stopped when the command is run again. A running
    daemon picks the new folder up like any folder dropped into the models dir."""
    from ..config import Paths
    from ..fetch.download import Mirror
    from ..fetch.get import GetRequest, get_voice

    _check_voice_arg(voice)  # before the network: offline, a hostile key is still exit 15, not 14
    paths = Paths.resolve(models=models_dir, cache=cache)
    trust = None
    if trusted_keys is not None:
        from ..signing import TrustedKeys

        trust = TrustedKeys.load(trusted_keys)
    from ..fetch.box import box_id as resolve_box_id

    client = daemon_client(socket_path, timeout=300, required=False)
    request = GetRequest(
        voice=voice,
        models=paths.models,
        downloads=paths.cache / "downloads",
        mirror=Mirror.parse(mirror, timeout),
        version=version,
        upgrade=upgrade,
        trust=trust,
        box=resolve_box_id(box_id, keep_in=paths.cache),
        daemon=client if client.available() else None,
    )
    result = get_voice(request, _RichReporter())
    for note in result.notes:
        console().print(note, markup=False)
    m = result.manifest
    if m is None:  # a staged version this box is outside of, and nothing older for it: where it should be
        console().print(f"{voice}: no version on the mirror is for this box yet", markup=False)
        return
    if not result.fetched:
        console().print(f"{result.folder}: {m.name} {m.version} is up to date with the catalog", markup=False)
        return
    console().print(f"{result.folder}: voice {m.name} {m.version}, licence: {m.license}", markup=False)
