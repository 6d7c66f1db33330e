"""The synthesis pool: a bounded queue in front of a few worker threads.

Front ends (HTTP, spool) call ``submit`` from the event loop; it never blocks. A full queue is a
``BusyError`` (HTTP 503 + Retry-After), not unbounded memory. The request's model lease is taken by
the caller before submitting and released here when the job ends, so the version a request started
with serves it to the end. Synthesis runs only on worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..audio import Audio, concat
from ..engines.threads import BUSY, BusyElsewhere, load_threads
from ..errors import (
    AudioTooLongError,
    BusyError,
    RequestError,
    ResourceError,
    SynthesisError,
    TtsdError,
    is_system_oserror,
    out_of_memory,
    resource_error,
)
from ..metrics import Metrics
from ..options import SynthesisOptions
from ..serving.serving_map import Lease

log = logging.getLogger("ttsd.synth")

ChunkSink = Callable[[Audio], object]  # what it returns is ignored


class Cancelled(Exception):
    """The client went away; the job stopped between sentences."""


@dataclass
class Job:
    text: str
    options: SynthesisOptions
    lease: Lease
    route: str
    on_chunk: ChunkSink | None = None  # streaming: called on the worker thread per piece of audio
    cancel: threading.Event = field(default_factory=threading.Event)
    accepted: float = field(default_factory=time.monotonic)
    # False: a part of a request (a sentence of a Wyoming text stream) whose outcome the front end
    # counts once for the whole, so the canary and auto-rollback see requests, not sentences
    counted: bool = True
    # seconds of audio this job may make, when its request has a limit of its own below the
    # engine's (a Wyoming text stream's later sentences: what its earlier ones left of the cap)
    audio_limit: float | None = None


@dataclass(frozen=True)
class Result:
    audio: Audio | None  # None when streamed
    audio_seconds: float
    synth_seconds: float
    queued_seconds: float


def check_chunk(chunk: Audio) -> float:
    """A model that starts producing NaN fails the request (and counts against the version, for
    auto-rollback). Returns the chunk's peak, for ``check_loudness``."""
    samples = chunk.samples
    if not np.all(np.isfinite(samples)):
        raise SynthesisError("the voice produced invalid audio (NaN or infinite samples)")
    return float(np.max(np.abs(samples))) if len(samples) else 0.0


def check_loudness(peak: float) -> None:
    """A request whose whole audio is silent fails the same way. Checked over the request, not per
    chunk: a streamed piece of a sentence may legitimately be a quiet moment."""
    if peak < 1e-4:
        raise SynthesisError("the voice produced silence")


class SynthesisPool:
    def __init__(self, *, workers: int, queue_size: int, metrics: Metrics, busy: BusyElsewhere = BUSY) -> None:
        self.workers = workers
        self._busy = busy  # how busy other programs keep the cores: a request runs on fewer threads then
        self.queue_size = queue_size
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ttsd-synth")
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self._running = 0
        self.completed = 0
        self.failed = 0
        self.refused = 0
        self.cancelled = 0
        self._running_jobs: dict[int, Job] = {}  # by id: for ``cancel_all`` at the end of a shutdown's grace
        busy.cores()  # a first reading: the first request sees how busy the box was since

    def depth(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._lock:
            return self._pending - self._running, self._running

    def submit(self, job: Job) -> Future[Result]:
        """Check the job's options against its voice, then queue it. ``RequestError`` for an option
        the voice cannot take, ``BusyError`` if the queue is full; the lease is released then, and
        neither counts against the model."""
        try:
            job.options = job.lease.engine.check_options(job.options)
        except RequestError:
            job.lease.release()
            raise
        with self._lock:
            if self._pending >= self.workers + self.queue_size:
                job.lease.release()
                raise BusyError(f"queue full ({self.queue_size} waiting); retry shortly", retry_after=1)
            self._pending += 1
            self.metrics.queue_depth.set(self._pending - self._running)
        future = self._executor.submit(self._run, job)
        future.add_done_callback(lambda f: self._dropped(job) if f.cancelled() else None)
        return future

    def _dropped(self, job: Job) -> None:
        """A queued job cancelled before a worker took it (its client went away; the asyncio side
        cancels the future it awaits): ``_run`` never runs, so its slot and lease end here. Without
        this, every client that hung up while queued took a queue slot and a lease for good."""
        job.cancel.set()
        job.lease.release()
        with self._lock:
            self._pending -= 1
            self.cancelled += 1
            self.metrics.queue_depth.set(self._pending - self._running)

    def _run(self, job: Job) -> Result:
        with self._lock:
            self._running += 1
            self._running_jobs[id(job)] = job
            self.metrics.queue_depth.set(self._pending - self._running)
            self.metrics.in_flight.set(self._running)
        started = time.monotonic()
        # Did the model do its job? True/False count for the version (auto-rollback, canary);
        # None: the request's own fault or the box's, which never count against a model.
        ok: bool | None = None
        try:
            if job.cancel.is_set():
                raise Cancelled()
            chunks: list[Audio] = []
            seconds = peak = 0.0
            # Streamed jobs take pieces of sentences as soon as the decoder has them.
            # text was checked by the front end, options by submit(): not again per request
            pieces = job.on_chunk is not None
            first = True
            # each piece on the threads the box allows now: fewer while other programs keep the CPUs busy
            # (load_threads closes the stream when the block ends, on this thread, however it ends)
            stream = job.lease.engine.synthesize_stream(job.text, job.options, pieces=pieces, checked=True)
            with load_threads(stream, self._busy) as steps:
                for chunk in steps:
                    if job.cancel.is_set():
                        raise Cancelled()
                    if first:
                        first = False
                        voice = job.lease.voice
                        self.metrics.first_audio.labels(voice.name, voice.version).observe(
                            time.monotonic() - job.accepted
                        )
                    peak = max(peak, check_chunk(chunk))
                    seconds += chunk.duration
                    if job.audio_limit is not None and seconds > job.audio_limit:
                        raise AudioTooLongError(
                            f"the audio would pass what is left of --max-audio-seconds to this request "
                            f"({job.audio_limit:g} s); the rest is not spoken"
                        )
                    if job.on_chunk is not None:
                        job.on_chunk(chunk)
                    else:
                        chunks.append(chunk)
            check_loudness(peak)
            ok = True
            served = job.lease.voice
            synth_seconds = time.monotonic() - started
            self.metrics.audio_seconds.labels(served.name, served.version).inc(seconds)
            self.metrics.synthesis_seconds.labels(served.name, served.version).inc(synth_seconds)
            return Result(
                audio=concat(chunks) if job.on_chunk is None else None,
                audio_seconds=seconds,
                synth_seconds=synth_seconds,
                queued_seconds=started - job.accepted,
            )
        except Cancelled:
            raise
        except Exception as exc:
            ok, error = _judged(job, exc)
            if error is exc:
                raise
            raise error from exc
        finally:
            job.lease.release(ok if job.counted else None)
            with self._lock:
                self._running -= 1
                self._pending -= 1
                self._running_jobs.pop(id(job), None)
                if ok:
                    self.completed += 1
                elif ok is False:
                    self.failed += 1  # the model's fault
                elif job.cancel.is_set():
                    self.cancelled += 1
                else:
                    self.refused += 1  # the request's or the box's fault
                self.metrics.queue_depth.set(self._pending - self._running)
                self.metrics.in_flight.set(self._running)

    def cancel_all(self) -> int:
        """Stop every running job after its current piece of audio (the shutdown's grace is
        over); how many there were. Queued jobs are cancelled by ``shutdown``."""
        with self._lock:
            running = list(self._running_jobs.values())
        for job in running:
            job.cancel.set()
        return len(running)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)


def _judged(job: Job, exc: Exception) -> tuple[bool | None, Exception]:
    """Whose fault a failed job was (False: the model's, counted against its version; None: the
    request's or the box's) and the error its client gets."""
    voice = job.lease.voice
    if job.lease.cut:  # its version was unloaded under it: the daemon's doing, and a retry is served
        return None, BusyError(
            f"{voice.name} {voice.version} was taken out of service while this request ran "
            "(an upgrade under --swap-policy memory, a voice's removal, or a shutdown); retry",
            retry_after=2,
        )
    if isinstance(exc, TtsdError):
        return (False if exc.fault == "model" else None), exc
    if isinstance(exc, OSError):
        if not is_system_oserror(exc):
            return False, SynthesisError(f"the voice failed: {type(exc).__name__}: {exc}")
        return None, resource_error(exc, "synthesizing")
    if out_of_memory(exc):  # the box ran out of memory: a 503 to retry, not counted against the model
        log.error("out of memory synthesizing on %s %s: %s", voice.name, voice.version, exc)
        return None, ResourceError("out of memory while synthesizing; retry shortly")
    # the engine crashed on a valid request: the model's fault
    log.error("synthesis failed on %s %s", voice.name, voice.version, exc_info=exc)
    return False, SynthesisError(f"the voice failed: {type(exc).__name__}: {exc}")
