"""``ttsd models``: make, check and list model folders (no daemon needed). Getting voices from a
catalog or a mirror, and publishing to one, is in ``ttsd.cli.fetching``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, TtsdError, VerifyError
from .common import PRECISION_CHOICES, SOCKET_HELP, console, shown, trusted_keys_option


@click.group()
def models() -> None:
    """Make, check and list model folders; find and get Piper voices."""


@models.command("import-piper")
@click.argument("onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="Voice name (default: the .onnx file name).")
@click.option("--version", "version", default="1", show_default=True, help="PEP 440 version of this folder.")
@click.option("--license", "license_", default="", help="Licence text to record in the manifest.")
def import_piper_cmd(onnx: Path, out_dir: Path, name: str | None, version: str, license_: str) -> None:
    """Convert a Piper voice (VOICE.onnx + VOICE.onnx.json) into a ttsd model folder."""
    from ..voices import import_piper

    out = console()
    with out.status("importing…") as status:
        manifest = import_piper(
            onnx, out_dir, name=name, version=version, license=license_, progress=lambda msg: status.update(f"{msg}…")
        )
    out.print(f"{out_dir}: voice {manifest.name} {manifest.version}, {len(manifest.files)} files", markup=False)


@models.command("pack")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="Voice name [default: the name in FOLDER's ttsd.json].")
@click.option("--version", "version", required=True, help="PEP 440 version, e.g. 1 or 2.1.")
@click.option("--engine", help="Engine that loads this folder [default: ttsd.json's, else vits].")
@click.option("--sample-rate", type=click.IntRange(1), help="Default: ttsd.json's, else config.json's sampling_rate.")
@click.option("--warmup", multiple=True, help="Warm-up sentence (repeatable) [default: ttsd.json's].")
@click.option("--description", help="[default: ttsd.json's]")
@click.option("--license", "license_", help="[default: ttsd.json's]")
@click.option(
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    help="The voice's number format: auto (bf16 where the CPU has native bf16) or fp32 (this voice "
    "must stay fp32); the daemon's --precision overrides it [default: ttsd.json's, else auto].",
)
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also sign the folder with this private key (see 'ttsd models sign').",
)
def pack_cmd(
    folder: Path,
    name: str | None,
    version: str,
    engine: str | None,
    sample_rate: int | None,
    warmup: tuple[str, ...],
    description: str | None,
    license_: str | None,
    precision: str | None,
    sign_key: Path | None,
) -> None:
    """Write the checksummed manifest (ttsd.json) for FOLDER, e.g. a downloaded MMS-TTS checkpoint.

    A FOLDER that has a ttsd.json already (a copy of a voice's folder, to become its next
    version) keeps what that one says unless told otherwise: 'ttsd models pack COPY --version 2'."""
    from ..engines import engine_class
    from ..manifest import Manifest, pack, read_manifest

    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such directory")
    old: Manifest | None = None
    if (folder / "ttsd.json").is_file():
        try:
            old = read_manifest(folder)
        except TtsdError as exc:
            if name is None:
                raise ConfigError(f"{folder}/ttsd.json cannot be read ({exc}); give --name to write a new one") from exc
    if name is None and old is None:
        raise ConfigError(f"{folder} has no ttsd.json: give --name")
    engine = engine or (old.engine if old else "vits")
    cls = engine_class(engine)  # refuse an engine that is not installed before hashing gigabytes
    if sample_rate is None:
        sample_rate = old.sample_rate if old and old.engine == engine else cls.default_sample_rate(folder)
        if sample_rate is None:  # e.g. config.json's sampling_rate, for vits
            raise ConfigError(f"{folder}: give --sample-rate (the {engine} engine finds none in the folder)")
    # a key that cannot sign is refused before ttsd.json is rewritten (and read once: it may be a pipe)
    signer = _signer(sign_key) if sign_key is not None else None
    manifest = pack(
        folder,
        name=name or old.name,  # type: ignore[union-attr]  # one of them is set (checked above)
        version=version,
        engine=engine,
        sample_rate=sample_rate,
        warmup=warmup or (old.warmup if old else ()),
        description=description if description is not None else (old.description if old else ""),
        license=license_ if license_ is not None else (old.license if old else ""),
        precision=precision or (old.precision if old else "auto"),
    )
    console().print(
        f"{folder}/ttsd.json: {manifest.name} {manifest.version}, {len(manifest.files)} files", markup=False
    )
    if sign_key is not None:
        _sign(folder, sign_key, signer)
    elif (folder / "model.sig").exists():
        console().print(
            f"note: {folder}/model.sig was made before this manifest; sign the folder again ('ttsd models sign')",
            markup=False,
        )


def _signer(key: Path) -> Any:
    """The signing config for ``key`` (its password from TTSD_SIGN_KEY_PASSWORD), or ``ConfigError``."""
    import os

    from ..signing import signer_config

    return signer_config(key, os.environ.get("TTSD_SIGN_KEY_PASSWORD") or None)


def _sign(folder: Path, key: Path, config: Any = None) -> None:
    from ..manifest import verify
    from ..signing import sign

    verify(folder)  # sign only what matches its manifest
    signer = sign(folder, key, config=config or _signer(key))
    console().print(f"{folder}/model.sig: signed (key {signer.hint[:12]})", markup=False)


@models.command("sign")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--key",
    "key",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Elliptic-curve private key in PEM (openssl ecparam -name prime256v1 -genkey -noout). "
    "A password-protected key reads its password from TTSD_SIGN_KEY_PASSWORD.",
)
def sign_cmd(folder: Path, key: Path) -> None:
    """Sign FOLDER (after checking it against its manifest): writes FOLDER/model.sig in the OpenSSF
    model-signing format, which 'model_signing verify key' and 'ttsd serve --trusted-keys' accept."""
    _sign(folder, key)


@models.command("verify")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@trusted_keys_option("Also require a signature by one of these public keys [env TTSD_TRUSTED_KEYS].")
def verify_cmd(folder: Path, trusted_keys: Path | None) -> None:
    """Check FOLDER against its manifest; say exactly which file is missing, extra or wrong; and
    who signed it."""
    from ..engines import engine_class
    from ..errors import VerifyError
    from ..manifest import verify
    from ..signing import TrustedKeys, describe

    try:
        manifest = verify(folder)
    except VerifyError as exc:
        out = console()
        for problem in exc.problems[1:]:
            out.print(f"  {problem}", markup=False)
        raise
    try:
        engine_class(manifest.engine)
    except TtsdError as exc:
        raise type(exc)(f"{folder}: {exc}") from None
    if trusted_keys is not None:
        signed = f"signed by {TrustedKeys.load(trusted_keys).check(folder, manifest)}"
    else:
        claimed = describe(folder)
        signed = "unsigned" if claimed is None else f"signature not checked: {claimed}; give --trusted-keys"
    console().print(
        f"{folder}: ok ({manifest.name} {manifest.version}, {len(manifest.files)} files verified, {signed})",
        markup=False,
    )


@models.command("list")
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_MODELS",
    help="Models directory [env TTSD_MODELS].",
)
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET", help=SOCKET_HELP)
@click.option(
    "--verify/--no-verify", "check", default=False, help="Check every checksum on disk (exit 6 if a folder fails)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(models_dir: Path | None, socket_path: Path | None, check: bool, as_json: bool) -> None:
    """Every version of every voice and its state (from the running daemon, else from disk)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..client import Client
    from ..config import Paths, default_socket

    client = Client(socket_path or default_socket(), timeout=30)
    rows: list[tuple[str, str, str, str, str, str]] = []  # voice, version, state, signer, reason, folder
    checked = False
    info = client.status() if client.available() else None
    beside = ""  # what the daemon that answers serves, when the listing is read from disk
    if info is not None and models_dir is not None and models_dir.resolve() != Path(info["models"]).resolve():
        beside = f"; the daemon serves {info['models']}"  # another dir than the daemon's: read from disk
        info = None
    elif info is not None and check:  # --verify reads every byte on disk now, whatever the daemon says
        if models_dir is None and not Path(info["models"]).is_absolute():  # relative to where it started
            raise ConfigError(f"the daemon names its models dir {info['models']!r} only: give --models DIR")
        models_dir = models_dir or Path(info["models"])
        beside = f"; the daemon, pid {info['pid']}, serves from it"
        info = None
    if info is not None:
        title = f"daemon pid {info['pid']}: {info['models']}"
        for voice in info["voices"]:
            for v in voice["versions"]:
                rows.append((voice["name"], v["version"], v["state"], v.get("signer") or "", v["reason"] or "", ""))
        for folder in info["folders"]:
            name = Path(folder["folder"]).name
            rows.append((name, "-", folder["state"], "", folder["reason"], name))
    else:
        from ..engines import engine_class
        from ..manifest import verify
        from ..models_dir import scan
        from ..signing import describe

        paths = Paths.resolve(models=models_dir)
        if not paths.models.is_dir():
            raise ConfigError(f"no models dir {paths.models} (give --models, or TTSD_MODELS)")
        title = f"{paths.models} ({'verified on disk' if check else 'on disk'}{beside or ', no daemon running'})"
        checked = check
        for cand in scan(paths.models):
            m = cand.manifest
            link = cand.folder.is_symlink()  # refused as a link, wherever it points: never read through
            state, reason = ("on disk", "") if m is not None else ("refused" if link else "unreadable", cand.problem)
            if m is not None and check:
                try:
                    verify(cand.folder)
                    engine_class(m.engine)  # as 'ttsd models verify' and the daemon: one it cannot run
                    state = "verified"
                except TtsdError as exc:
                    state, reason = "refused", str(exc)
            claimed = None if link else describe(cand.folder)
            rows.append(
                (
                    m.name if m else cand.folder.name,
                    m.version if m else "-",
                    state,
                    "" if claimed is None else str(claimed),
                    reason,
                    cand.folder.name,
                )
            )
    if as_json:
        fields = ("voice", "version", "state", "signer", "reason", "folder")
        click.echo(json.dumps([dict(zip(fields, r, strict=True)) for r in rows], indent=2))
    else:
        table = Table(title=title)
        # a narrow terminal folds the reason and wraps names rather than cut a voice's name short
        table.add_column("voice", overflow="fold", min_width=12)
        for name in ("version", "state", "signer"):
            table.add_column(name, overflow="fold")
        table.add_column("reason", overflow="fold", ratio=1)
        folders = info is None  # read from disk: two folders of one version are told apart
        if folders:
            table.add_column("folder", overflow="fold")
        for row in rows:
            table.add_row(*(Text(shown(cell)) for cell in row[: 6 if folders else 5]))
        Console().print(table)
    refused = sum(row[2] in ("refused", "unreadable") for row in rows) if checked else 0
    if refused:  # `ttsd models list --verify && ...` stops here
        raise VerifyError(f"{refused} of {len(rows)} folders cannot serve (the reasons are listed)")


@models.command("remove")
@click.argument("voice")
@click.option("--reason", help="Why, for the daemon's log and audit trail [default: removed].")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), envvar="TTSD_SOCKET", help=SOCKET_HELP)
@click.option(
    "--models",
    "models_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_MODELS",
    help="With no daemon running: its models dir [env TTSD_MODELS].",
)
@click.option(
    "--state",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_STATE",
    help="With no daemon running: its state dir [env TTSD_STATE].",
)
def remove_cmd(
    voice: str, reason: str | None, socket_path: Path | None, models_dir: Path | None, state_dir: Path | None
) -> None:
    """Take VOICE out of the daemon, with no restart: requests for it get 'unknown voice' at once,
    those already running finish, and its store copies and records go (its rollback marks stay).
    Delete its folders from the models dir first; the daemon's only voice and its --default-voice
    are not removed. With no daemon running, the same is done on disk (--models, --state)."""
    from ..client import Client
    from ..config import Paths, default_socket, default_state_dir
    from ..serving.removal import remove_stopped

    if not voice.strip():
        raise click.BadParameter("an empty voice name", param_hint="VOICE")
    if reason is not None and (not reason.strip() or len(reason) > 300 or not reason.isprintable()):
        raise click.BadParameter("1 to 300 printable characters (leave it out for 'removed')", param_hint="--reason")
    client = Client(socket_path or default_socket(), timeout=120)
    info = client.status() if client.available() else None
    if info is not None and any(  # another box's dirs than the daemon's that answers: on disk, for that box
        given is not None and given.resolve() != Path(info.get(key) or given).resolve()
        for given, key in ((models_dir, "models"), (state_dir, "state"))
    ):
        info = None
    if info is not None:
        result = client.control(voice, "remove", {"reason": reason} if reason else {})
        where = ""
    else:  # no daemon answers, or one for other dirs: on disk, under the state dir's lock (exit 19 if held)
        models_dir = Paths.resolve(models=models_dir).models
        state_dir = state_dir or default_state_dir()
        result = remove_stopped(voice, models_dir, state_dir, reason or "removed")
        where = f" from {state_dir} (on disk: no daemon runs on it)"
    versions = ", ".join(str(v) for v in result["removed"]) or "no version"
    console().print(
        f"{shown(result['voice'])} removed ({shown(versions)}){shown(where)} in {result['seconds']:.2f} s",
        markup=False,
    )


@models.command("builtin")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TTSD_CACHE",
    help="Where converted voices are cached [env TTSD_CACHE].",
)
def builtin_cmd(cache: Path | None) -> None:
    """Print the folder of the built-in voice, converting it first if needed."""
    from ..config import Paths
    from ..voices import builtin_model

    out = console()
    with out.status("built-in voice…") as status:
        folder = builtin_model(Paths.resolve(cache=cache).cache, progress=lambda msg: status.update(f"{msg}…"))
    click.echo(str(folder))
