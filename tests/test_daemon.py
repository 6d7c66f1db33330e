"""End to end: ``ttsd serve`` in a subprocess on the real voice, for what only a real process
shows: seeding an empty models dir, its log, the socket's mode, real-voice speech and streaming,
memory, a hang-up on the daemon's own runner, ``ttsd say``/``status`` against it, and a second
daemon refused.

The API's behaviour (formats, headers, streaming, the OpenAI route, bad requests, the full queue,
cancellation, metrics, control routes) is tested in-process over a fake backend in
``test_api.py``; the spool's in ``test_spool.py``; argument errors in ``test_cli_args.py``."""

from __future__ import annotations

import io
import json
import platform
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from daemon_util import Daemon, UnixHTTPConnection, start_daemon, wait_for

LONG = " ".join(f"This is sentence number {i} of a long request that keeps the worker busy." for i in range(12))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, joe_folder: Path) -> Iterator[Daemon]:
    """One daemon for the module: built-in voice seeded into an empty models dir, 1 worker, queue of 1."""
    d = start_daemon(tmp_path_factory.mktemp("serve"), cache_dir, "--workers", "1", "--queue-size", "1",
                     per_test=False)
    try:
        yield d
    finally:
        assert d.stop() == 0, d.logs()


@pytest.mark.daemon
def test_empty_models_dir_is_seeded_and_served(daemon: Daemon) -> None:
    voices = daemon.request("GET", "/v1/voices").json()["voices"]
    assert [(v["name"], v["active"]) for v in voices] == [("en_US-joe-medium", "1")]
    assert (daemon.root / "models" / "en_US-joe-medium-1" / "ttsd.json").is_file()
    assert daemon.request("GET", "/healthz").status == 200
    assert daemon.request("GET", "/readyz").status == 200
    # the seeded voice was waited for: no failure is announced a second before it serves
    logs = daemon.logs()
    assert "no voice serves" not in logs and "voices: none" not in logs, logs
    assert "serving" in logs and "(voices: en_US-joe-medium 1)" in logs, logs
    # the daemon counts its model events into the metrics it serves
    metrics = daemon.request("GET", "/metrics").body.decode()
    assert 'ttsd_model_loads_total{outcome="ok",voice="en_US-joe-medium"} 1.0' in metrics
    assert 'ttsd_model_swaps_total{voice="en_US-joe-medium"} 1.0' in metrics


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc-only")
def test_daemon_runs_with_ttsd_malloc_settings(daemon: Daemon) -> None:
    """The daemon process set glibc's malloc up before its threads started (ttsd.malloc), and says so;
    once its voices were up, it left the heap made so far out of later garbage collections."""
    logs = daemon.logs()
    assert "malloc: arena_max=1 mmap_threshold=32MiB trim_threshold=128MiB" in logs, logs
    frozen = re.search(r"gc: (\d+) objects made at start-up left out of later collections", logs)
    assert frozen is not None and int(frozen.group(1)) > 20_000, logs


def test_socket_is_private(daemon: Daemon) -> None:
    mode = stat.S_IMODE(daemon.socket.stat().st_mode)
    assert mode == 0o600, oct(mode)


@pytest.mark.daemon
def test_synthesize_wav_and_headers(daemon: Daemon) -> None:
    reply = daemon.post("/v1/synthesize", {"text": "Hello from the daemon.", "seed": 3})
    assert reply.status == 200 and reply.headers["content-type"] == "audio/wav"
    assert reply.headers["x-ttsd-voice"] == "en_US-joe-medium" and reply.headers["x-ttsd-version"] == "1"
    assert reply.headers["x-ttsd-sample-rate"] == "22050"
    samples, rate = soundfile.read(io.BytesIO(reply.body))
    assert rate == 22050 and 0.5 < len(samples) / rate < 4
    assert float(reply.headers["x-ttsd-audio-seconds"]) == pytest.approx(len(samples) / rate, abs=1e-3)
    metrics = daemon.request("GET", "/metrics").body.decode()
    assert 'ttsd_requests_total{outcome="ok",route="synthesize",version="1",voice="en_US-joe-medium"}' in metrics


def longest_silence(samples: np.ndarray) -> int:
    """Index of the middle of the longest run of exact zeros."""
    edges = np.diff(np.concatenate([[0], (samples == 0).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    longest = int(np.argmax(ends - starts))
    return int(starts[longest] + ends[longest]) // 2


@pytest.mark.daemon
def test_streaming_sends_the_same_speech_in_pieces(daemon: Daemon) -> None:
    """A stream goes out piece by piece below the sentence (the first piece after one small decoder
    window), scaled by the voice's warm-up gain instead of per-sentence peaks: the same speech,
    the same length, a different loudness per sentence."""
    text = "The first sentence is short. The second one is a little bit longer than the first."
    whole = daemon.post("/v1/synthesize", {"text": text, "format": "pcm", "seed": 5})
    assert whole.status == 200 and whole.headers["x-ttsd-sample-rate"] == "22050"
    conn = UnixHTTPConnection(daemon.socket)
    conn.request("POST", "/v1/synthesize", body=json.dumps({"text": text, "stream": True, "seed": 5}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    body = resp.read()
    conn.close()
    assert body[:4] == b"RIFF" and body[36:40] == b"data"
    streamed = np.frombuffer(body[44:], dtype="<i2").astype(np.float64)
    reference = np.frombuffer(whole.body, dtype="<i2").astype(np.float64)
    assert streamed.shape == reference.shape
    cut = longest_silence(reference)  # the middle of the pause between the two sentences
    assert abs(cut - longest_silence(streamed)) < 100
    for part in (slice(0, cut), slice(cut, None)):  # per sentence: the same waveform, scaled
        assert np.corrcoef(streamed[part], reference[part])[0, 1] > 0.999
    assert 0.2 < np.abs(streamed).max() / 32767 <= 1.0


def decoded_seconds(data: bytes) -> float:
    """How long an Ogg Opus or ADTS AAC reply plays, decoded by FFmpeg (PyAV)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


@pytest.mark.daemon
def test_opus_and_aac_of_the_real_voice(daemon: Daemon) -> None:
    """The 22050 Hz voice as Opus (resampled to 24 kHz) and AAC: 1. whole from the OpenAI route,
    as long as the audio the daemon says it made; 2. streamed from /v1/synthesize with a seed, as
    long as the whole PCM of that seed (the stream is one continuous file, not pieces)."""
    text = "The first sentence is short. The second one is a little bit longer than the first."
    whole = daemon.post("/v1/synthesize", {"text": text, "format": "pcm", "seed": 5})
    made = len(whole.body) / 2 / 22050
    for fmt in ("opus", "aac"):
        reply = daemon.post("/v1/audio/speech", {"model": "tts-1", "input": text, "response_format": fmt,
                                                 "stream": False})  # whole: it says how much audio it made
        assert reply.status == 200 and reply.headers["content-type"] == f"audio/{fmt}", reply.body[:300]
        assert decoded_seconds(reply.body) == pytest.approx(float(reply.headers["x-ttsd-audio-seconds"]), abs=0.15)
        streamed = daemon.post("/v1/synthesize", {"text": text, "format": fmt, "stream": True, "seed": 5})
        assert streamed.status == 200 and streamed.headers["transfer-encoding"] == "chunked"
        assert decoded_seconds(streamed.body) == pytest.approx(made, abs=0.15)


@pytest.mark.daemon
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_an_unpunctuated_text_costs_no_more_memory_than_a_punctuated_one(daemon: Daemon) -> None:
    """1. Normal traffic: a 12-sentence request sets the daemon's normal peak RSS.
    2. 4,990 characters with no sentence end (it took the daemon to 9 GB when the encoder saw it
       as one sentence) are spoken in pieces: 200, and about 4 minutes of audio.
    3. The peak grew by less than 150 MB: the response itself (4 minutes of float32 samples, their
       join and the WAV encoding, ~80 MB) plus allocator slack; the unsplit sentence needed GBs."""
    for _ in range(2):
        assert daemon.post("/v1/synthesize", {"text": LONG}).status == 200
    normal = daemon.rss_mb("VmHWM")
    text = ("hello world " * 420)[:4990]
    reply = daemon.post("/v1/synthesize", {"text": text}, timeout=300)
    assert reply.status == 200, reply.body[:300]
    assert float(reply.headers["x-ttsd-audio-seconds"]) > 180
    grown = daemon.rss_mb("VmHWM") - normal
    assert grown < 150, f"peak RSS grew {grown:.0f} MB over the normal {normal:.0f} MB"


@pytest.mark.daemon
def test_client_disconnect_cancels_the_rest(daemon: Daemon) -> None:
    """A streamed request whose client goes away after the first audio stops after the current
    sentence, through the daemon's own runner and listener (handler cancellation; test_api.py shows
    the API side in-process): in well under half the time the whole request takes (measured here
    first, on the same daemon, so a slower box moves both)."""
    whole = daemon.post("/v1/synthesize", {"text": LONG})
    assert whole.status == 200
    synthesis = float(whole.headers["x-ttsd-synthesis-seconds"])
    cancelled = daemon.metric("ttsd_requests_total", route="synthesize", outcome="cancelled")
    conn = UnixHTTPConnection(daemon.socket)
    conn.request("POST", "/v1/synthesize", body=json.dumps({"text": LONG, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read1(100)  # first audio arrived
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    started = time.monotonic()
    wait_for(lambda: daemon.request("GET", "/v1/status").json()["queue"]["running"] == 0, timeout=120,
             what="the cancelled job to stop")
    stopped = time.monotonic() - started
    # 12 sentences; a cancelled job stops after the current one.
    assert stopped < synthesis / 2, (stopped, synthesis)
    wait_for(lambda: daemon.metric("ttsd_requests_total", route="synthesize", outcome="cancelled") == cancelled + 1,
             timeout=30, what="the request counted as cancelled")


def test_say_uses_the_daemon_and_status_reads_it(daemon: Daemon, tmp_path: Path) -> None:
    env = dict(daemon.env, TTSD_SOCKET=str(daemon.socket))
    out = tmp_path / "via.wav"
    proc = subprocess.run([sys.executable, "-m", "ttsd", "say", "Through the daemon.", "-o", str(out)],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0 and "via daemon" in proc.stderr.decode(), proc.stderr.decode()
    assert soundfile.info(str(out)).samplerate == 22050
    proc = subprocess.run([sys.executable, "-m", "ttsd", "say", "", "-o", str(out)], env=env, capture_output=True)
    assert proc.returncode == 4 and proc.stderr.decode().startswith("error: text is empty")
    proc = subprocess.run([sys.executable, "-m", "ttsd", "status", "--json"], env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    status = json.loads(proc.stdout)
    assert status["voices"][0]["name"] == "en_US-joe-medium" and status["voices"][0]["active"] == "1"
    assert status["uptime"] > 0 and status["requests"]["completed"] >= 1


def test_say_without_a_daemon(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ttsd", "say", "Hi.", "-o", str(tmp_path / "x.wav"), "--daemon"],
                          env=cli_env, capture_output=True)
    assert proc.returncode == 9 and "no daemon answers" in proc.stderr.decode()
    proc = subprocess.run([sys.executable, "-m", "ttsd", "status"], env=cli_env, capture_output=True)
    assert proc.returncode == 9


@pytest.mark.daemon
def test_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, cache_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ttsd", "serve", "--models", str(tmp_path / "m"), "--state",
                           str(tmp_path / "s"), "--socket", str(daemon.socket), "--no-seed"],
                          env=daemon.env, capture_output=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stderr.decode().strip().splitlines()[-1] == f"error: another ttsd is already serving on {daemon.socket}"


@pytest.mark.daemon
def test_second_daemon_on_the_same_state_dir_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    """A second daemon given the running one's --state (on a socket of its own) would be a second
    writer of state.json, the audit trail and the store: it exits 19 with one line, before it
    seeds or loads anything, and the first daemon's state dir is as it was."""
    state = daemon.root / "state"
    before = sorted(p.name for p in state.iterdir())
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ttsd", "serve", "--models", str(tmp_path / "m"), "--state",
                             str(state), "--socket", str(tmp_path / "other.sock")],
                            env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the second daemon ran beside the first") from None
    assert proc.returncode == 19, err.decode()
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("error: another ttsd (pid ") and str(state) in lines[-1], lines
    assert f"pid {daemon.proc.pid})" in lines[-1]
    assert not (tmp_path / "m").exists() and not (tmp_path / "other.sock").exists()  # nothing seeded or bound
    assert sorted(p.name for p in state.iterdir()) == before
    assert time.monotonic() - started < 30
    assert daemon.request("GET", "/readyz").status == 200
