"""What Wyoming's describe calls ttsd's voices (Home Assistant shows the description as the voice's
name), and which voice a request that names only a language gets: in-process for the rules, then
a daemon with two voices (a Piper-style name with a MODEL_CARD, and one named freely that speaks
de_DE), driven by the ``wyoming`` package's client."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_util import Daemon, start_daemon, wait_for
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncUnixClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from ttsd.errors import RequestError, UnknownVoiceError
from ttsd.front.wyoming_voices import attribution, choose_voice, short_name

CARD = """# Model card for joe (medium)

* Language: en_US (English, United States)
* Quality: medium

## Dataset

* URL: https://github.com/NabuCasa/voice-datasets
* License: CC0
"""


@pytest.mark.parametrize("name, shown", [
    ("en_US-joe-medium", "joe (medium)"),
    ("de_DE-thorsten_emotional-medium", "thorsten emotional (medium)"),
    ("zh_CN-huayan-x_low", "huayan (x_low)"),
    ("fil_PH-someone-high", "someone (high)"),
    ("kitchen", "kitchen"),  # not a Piper-style name: as is
    ("en_US-joe-medium-v2", "en_US-joe-medium-v2"),
    ("en_US-joe-loud", "en_US-joe-loud"),
])
def test_a_piper_style_name_is_shown_short_as_wyoming_piper_shows_it(name: str, shown: str) -> None:
    assert short_name(name) == shown


def voice(name: str, languages: list[str], *, default: bool = False, active: str | None = "1",
          license: str = "", folder: Path | None = None) -> dict[str, Any]:
    return {"name": name, "languages": languages, "default": default, "active": active, "license": license,
            "versions": [{"version": "1", "source": str(folder) if folder else None}]}


def test_the_attribution_is_the_voices_licence_and_its_model_cards_url(tmp_path: Path) -> None:
    with_card = tmp_path / "carded"
    with_card.mkdir()
    (with_card / "MODEL_CARD").write_text(CARD)
    got = attribution(voice("a", [], license="CC0", folder=with_card))
    assert (got.name, got.url) == ("CC0", "https://github.com/NabuCasa/voice-datasets")
    # no card: a URL in the licence; neither: ttsd's
    got = attribution(voice("b", [], license="CC BY 4.0, see https://example.org/voice", folder=tmp_path))
    assert (got.name, got.url) == ("CC BY 4.0, see https://example.org/voice", "https://example.org/voice")
    got = attribution(voice("c", [], license="unknown (the MODEL_CARD names none)"))
    assert (got.name, got.url) == ("ttsd", "")
    got = attribution(voice("d", [], license="", folder=with_card))
    assert got.url == "https://github.com/NabuCasa/voice-datasets" and got.name


def test_a_language_alone_gets_a_voice_of_that_language_or_none() -> None:
    voices = [voice("en_US-joe-medium", ["en_US"], default=True), voice("de_DE-a-low", ["de_DE"]),
              voice("de_AT-b-low", ["de_AT"]), voice("mystery", []), voice("fr_FR-c-low", ["fr_FR"], active=None)]
    assert choose_voice(voices, "de_AT") == "de_AT-b-low"  # its own region first
    assert choose_voice(voices, "de-de") == "de_DE-a-low"
    assert choose_voice(voices, "de") == "de_AT-b-low"  # the language in any region, by name
    assert choose_voice(voices, "de_CH") == "de_AT-b-low"
    assert choose_voice(voices, "EN") == "en_US-joe-medium"
    with pytest.raises(UnknownVoiceError, match="no voice speaks fr_FR"):
        choose_voice(voices, "fr_FR")  # that voice does not serve: never another language's instead
    with pytest.raises(UnknownVoiceError):
        choose_voice(voices, "e")
    for bad in ("", 5, "x" * 100):
        with pytest.raises(RequestError):
            choose_voice(voices, bad)


def copy_voice(models: Path, joe_folder: Path, name: str, *, files: dict[str, str] | None = None,
               **manifest: Any) -> None:
    """The built-in voice's weights (hard links) under another name and manifest."""
    from ttsd.manifest import pack

    staging = models.parent / f"stage-{name}"
    staging.mkdir()
    for item in joe_folder.iterdir():
        if item.name != "ttsd.json":
            os.link(item, staging / item.name)
    for file, text in (files or {}).items():
        (staging / file).write_text(text)
    pack(staging, name=name, version="1", engine="vits", sample_rate=22050, **manifest)
    os.rename(staging, models / f"{name}-1")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, joe_folder: Path) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("wyoming-names")
    models = root / "models"
    models.mkdir()
    copy_voice(models, joe_folder, "en_US-joe-medium", files={"MODEL_CARD": CARD}, license="CC0")
    copy_voice(models, joe_folder, "kitchen", extra={"languages": ["de_DE"]})
    d = start_daemon(root, cache_dir, "--no-seed", "--default-voice", "en_US-joe-medium",
                     "--wyoming", f"unix://{root / 'wyoming.sock'}", per_test=False)
    try:
        # the daemon serves once its default voice does; the other loads after it (its absence
        # from describe failed these tests one run in three)
        wait_for(lambda: {v["name"] for v in d.request("GET", "/v1/voices").json()["voices"] if v["active"]}
                 == {"en_US-joe-medium", "kitchen"}, timeout=120, what="both voices serving")
        yield d
    finally:
        assert d.stop() == 0, d.logs()


async def exchange(d: Daemon, *events: Event, until: str = "audio-stop") -> list[Event]:
    async with AsyncUnixClient(str(d.root / "wyoming.sock")) as client:
        for event in events:
            await client.write_event(event)
        answer: list[Event] = []
        while not answer or answer[-1].type != until:
            event = await asyncio.wait_for(client.read_event(), 60)
            assert event is not None, answer
            answer.append(event)
        return answer


@pytest.mark.daemon
def test_describe_names_voices_shortly_with_their_version_and_attribution(daemon: Daemon) -> None:
    (info,) = asyncio.run(exchange(daemon, Describe().event(), until="info"))
    voices = {v.name: v for v in Info.from_event(info).tts[0].voices}
    joe, kitchen = voices["en_US-joe-medium"], voices["kitchen"]
    assert (joe.description, joe.version, joe.languages) == ("joe (medium)", "1", ["en_US"])
    assert (joe.attribution.name, joe.attribution.url) == ("CC0", "https://github.com/NabuCasa/voice-datasets")
    assert (kitchen.description, kitchen.languages) == ("kitchen", ["de_DE"])
    assert (kitchen.attribution.name, kitchen.attribution.url) == ("ttsd", "")  # it says nothing of itself


def spoken_by(d: Daemon, name: str) -> float:
    return d.metric("ttsd_requests_total", voice=name, route="wyoming", outcome="ok")


@pytest.mark.daemon
@pytest.mark.parametrize("language, expected", [
    ("de_DE", "kitchen"), ("de-de", "kitchen"), ("de", "kitchen"), ("de_AT", "kitchen"), ("en", "en_US-joe-medium"),
])
def test_a_request_naming_only_a_language_is_spoken_in_it(daemon: Daemon, language: str, expected: str) -> None:
    before = spoken_by(daemon, expected)
    kinds = [e.type for e in asyncio.run(exchange(
        daemon, Synthesize(text="Guten Abend.", voice=SynthesizeVoice(language=language)).event()))]
    assert kinds[0] == "audio-start" and kinds[-1] == "audio-stop" and "audio-chunk" in kinds
    assert spoken_by(daemon, expected) == before + 1


@pytest.mark.daemon
def test_a_language_no_voice_speaks_is_an_error_never_another_languages_voice(daemon: Daemon) -> None:
    """A whole text: the error, then audio-stop, no audio. A text stream: the error, and
    synthesize-stopped for its stop; nothing spoken by any voice."""
    spoken = spoken_by(daemon, "kitchen") + spoken_by(daemon, "en_US-joe-medium")
    french = SynthesizeVoice(language="fr_FR")
    answer = asyncio.run(exchange(daemon, Synthesize(text="Bonsoir.", voice=french).event()))
    assert [e.type for e in answer] == ["error", "audio-stop"]
    error = Error.from_event(answer[0])
    assert error.code == "unknown_voice" and "fr_FR" in error.text and "de_DE" in error.text
    answer = asyncio.run(exchange(daemon, SynthesizeStart(voice=french).event(), SynthesizeChunk(text="Bonsoir. ").event(),
                                  SynthesizeChunk(text="À demain.").event(), SynthesizeStop().event(),
                                  until="synthesize-stopped"))
    assert [e.type for e in answer] == ["error", "synthesize-stopped"]
    assert spoken_by(daemon, "kitchen") + spoken_by(daemon, "en_US-joe-medium") == spoken
    assert not any(AudioChunk.is_type(e.type) or AudioStart.is_type(e.type) or AudioStop.is_type(e.type)
                   for e in answer)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_an_announcement_that_cannot_be_made_is_a_warning(host: str, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A box with only loopback up (no route to the mDNS group): the announcement raised, and the
    daemon exited 3, to be started again by systemd every 2 s. A loopback bind is not announced:
    no other box could reach the address it would give."""
    import errno
    import logging

    from ttsd.front import wyoming_mdns

    def unreachable() -> str:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(wyoming_mdns, "_outgoing_address", unreachable)
    advertisement = wyoming_mdns.Advertisement("box", host, 10200)
    with caplog.at_level(logging.WARNING, logger="ttsd.wyoming"):
        asyncio.run(advertisement.start())
    said = "cannot announce Wyoming over mDNS (" if host == "0.0.0.0" else "not announcing Wyoming over mDNS"
    assert said in caplog.text and advertisement._zeroconf is None
