"""In-process synthesis for ``ttsd say``: pick the model folder, verify it, load its engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Paths, default_state_dir
from .engines import Engine, create_engine
from .errors import ConfigError, ConflictError, TtsdError, UnknownVoiceError
from .manifest import verify
from .models_dir import find_versions
from .serving.versions import norm
from .voices import BUILTIN_VOICE, Progress, builtin_model


def resolve_model(
    paths: Paths,
    *,
    model_dir: Path | None = None,
    voice: str | None = None,
    progress: Progress | None = None,
    note: Progress | None = None,
    state_dir: Path | None = None,
) -> Path:
    """``--model`` if given, else ``--voice`` from the models dir, else the built-in voice (from
    the models dir where it is there, as the daemon's default serves it; else the cache's). Of a
    voice's versions, the newest that verifies and that the daemon (its state in ``state_dir``) has
    not rolled back, as the daemon would serve: a bad folder dropped in beside a good one is passed
    over with a ``note``, as the daemon refuses it."""
    if model_dir is not None:
        if not model_dir.is_dir():  # a path, not a bad model: exit 3 as for other paths
            raise ConfigError(
                f"--model {model_dir}: {'not a directory' if model_dir.exists() else 'no such directory'}"
            )
        return model_dir
    if voice is not None:
        try:
            versions = find_versions(paths.models, voice)
        except UnknownVoiceError:
            if voice != BUILTIN_VOICE:
                raise
        else:
            return _newest_good(voice, versions, state_dir or default_state_dir(), note or (lambda _msg: None))
    else:  # the built-in voice as the daemon serves it: an upgrade dropped into the models dir too
        say = note or (lambda _msg: None)
        try:
            versions = find_versions(paths.models, BUILTIN_VOICE)
            return _newest_good(BUILTIN_VOICE, versions, state_dir or default_state_dir(), say)
        except UnknownVoiceError:
            pass
        except (TtsdError, OSError) as exc:  # none there to serve: the cache's own copy speaks
            say(f"{BUILTIN_VOICE} in {paths.models}: {exc}; the built-in voice from the cache speaks")
    return builtin_model(paths.cache, progress or (lambda _msg: None))


def _newest_good(voice: str, versions: list[tuple[str, Path]], state_dir: Path, say: Progress) -> Path:
    first: TtsdError | None = None
    rolled_back, versions = _as_the_daemon(voice, versions, state_dir)
    for version, folder in versions:
        if norm(version) in rolled_back:
            say(f"{voice} {version} was rolled back; passed over")
            continue
        try:
            verify(folder)
        except TtsdError as exc:
            first = first or exc
            say(f"{voice} {version} does not verify ({exc}); passed over")
            continue
        return folder
    if first is not None:
        raise first
    raise ConflictError(f"every version of {voice} in the models dir was rolled back; name one with --model")


def _as_the_daemon(
    voice: str, versions: list[tuple[str, Path]], state_dir: Path
) -> tuple[set[str], list[tuple[str, Path]]]:
    """The versions of ``voice`` a daemon on this box rolled back, and ``versions`` (newest first)
    in the order it would serve them, from its ``state.json`` (or that file's copy; read only, best
    effort: newest first when neither can be read). Its active version comes first (from its store
    copy when its folder has left the models dir), after only the newer ones it has never seen (it
    takes those up when it starts): a newer one it knows and does not serve (an upgrade a rollback
    called off, a canary) does not speak in its place."""
    from .serving.state import read_state
    from .serving.store import ModelStore
    from .serving.versions import parsed

    records, known = read_state(state_dir)
    record = records.get(voice)
    if record is None:
        return set(), versions
    rolled_back = {norm(v) for v in record.rolled_back}
    active = record.active
    if active is None:
        return rolled_back, versions
    here = [v for v in versions if norm(v[0]) == norm(active)]
    if not here and (stored := ModelStore(state_dir / "store").get(voice, active)) is not None:
        here = [(active, stored)]
    if not here:
        return rolled_back, versions
    seen = {norm(key.partition("/")[2]) for key in known if key.partition("/")[0] == voice}
    unseen = [v for v in versions if parsed(v[0]) > parsed(active) and norm(v[0]) not in seen]
    rest = [v for v in versions if v not in unseen and norm(v[0]) != norm(active)]
    return rolled_back, [*unseen, *here, *rest]


def open_engine(folder: Path, **engine_options: Any) -> Engine[Any]:
    """Verify ``folder``, then construct, load and return its engine (no warm-up: one request)."""
    manifest = verify(folder)
    engine = create_engine(folder, manifest, **engine_options)
    engine.load()
    return engine
