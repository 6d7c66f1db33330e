"""``ttsd.engines.threads.thread_cores``: a thread's torch work held to fewer cores, and only that
thread's (the loader warms a new version up on one core beside the serving workers)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ttsd.engines import threads


@pytest.fixture(autouse=True)
def two_threads() -> object:
    """These tests are about a thread's count against the process's: give the process two (a
    test worker runs with one, see conftest) for their length, as a daemon on two cores has."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def test_thread_cores_holds_openmp_on_this_thread_only() -> None:
    if threads._openmp() is None:
        pytest.skip("no OpenMP runtime found")
    outside = torch.get_num_threads()
    if outside < 2:
        pytest.skip("needs 2 cores")
    seen: list[int] = []
    with threads.thread_cores(1):
        inside = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        other.start()
        other.join()
    assert (inside, torch.get_num_threads()) == (1, outside)
    assert seen[0] > 1  # a thread started meanwhile keeps the default


def test_thread_cores_holds_mkl_too() -> None:
    """MKL (float32 products) has a per-thread count of its own, which ``torch.set_num_threads`` sets:
    within ``thread_cores(1)`` it is 1 even on such a thread, and the thread's own count comes back
    after."""
    mkl = threads._mkl_local()
    if mkl is None:
        pytest.skip("torch here has no MKL")
    torch.set_num_threads(torch.get_num_threads())  # gives this thread an MKL count of its own
    before = mkl(0)  # each call returns the count it replaces
    mkl(before)
    with threads.thread_cores(1):
        inside = mkl(0)
        mkl(inside)
    after = mkl(0)
    mkl(after)
    assert (inside, after) == (1, before)


def test_thread_cores_holds_on_a_thread_that_has_not_run_torch_yet() -> None:
    """Loads run on fresh threads. torch gives a thread its process-wide count at its first op,
    which used to undo ``thread_cores(1)`` set before it: the warm-up then ran on two threads
    beside the workers' two (requests 2.4x slower during an upgrade). Inside the block, on a fresh
    thread, the count is 1 and a parallel op starts no OpenMP thread."""
    if threads._openmp() is None or torch.get_num_threads() < 2:
        pytest.skip("needs an OpenMP runtime and 2 cores")
    seen: dict[str, int] = {}

    def fresh() -> None:
        with threads.thread_cores(1):
            before = set(os.listdir("/proc/self/task"))  # threads by id: one ending meanwhile is no start
            seen["count"] = torch.get_num_threads()
            torch.ones(512, 512) @ torch.ones(512, 512)  # parallel in ATen/MKL
            torch.nn.functional.conv1d(torch.ones(1, 64, 4096), torch.ones(64, 64, 7))
            seen["started"] = len(set(os.listdir("/proc/self/task")) - before)

    thread = threading.Thread(target=fresh)
    thread.start()
    thread.join()
    assert seen == {"count": 1, "started": 0}


# -- the cores a warm-up runs on (ttsd.serving.loader) ----------------------------------------------


def test_cpu_ticks_sums_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    """Only the CPUs in the process's affinity count; the all-CPU line, other counters and lines it
    does not understand (an empty one too) are skipped."""
    mine = sorted(os.sched_getaffinity(0))
    other = max(mine) + 1
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  999 0 999 999 0 0 0 0 0 0\n\n"
        + "".join(f"cpu{n} 10 0 5 80 5 0 0 0 0 0\n" for n in mine)
        + f"cpu{other} 1000 0 0 0 0 0 0 0 0 0\n"
        "cpuX 1 2 3 4 5\ncpu7x 1 2 3 4 5\ncpu0\n \nintr 12 3 4\nctxt 55\n"
    )
    assert threads.cpu_ticks(stat) == (85 * len(mine), 100 * len(mine), tuple(mine))
    stat.write_text("intr 1 2 3\n")
    assert threads.cpu_ticks(stat) is None
    assert threads.cpu_ticks(tmp_path / "missing") is None


def test_free_cores_is_the_idle_share_times_the_cpus() -> None:
    two = (0, 1)
    readings = iter([(100, 200, two), (130, 260, two)])  # 30 of 60 ticks idle on 2 CPUs: one core free
    assert threads.FreeCores(lambda: next(readings)).measure(least=0) == pytest.approx(1.0)
    readings = iter([(100, 200, two), (101, 260, two)])
    assert threads.FreeCores(lambda: next(readings)).measure(least=0) == pytest.approx(2 / 60)
    assert threads.FreeCores(lambda: None).measure(least=0) is None
    readings = iter([(100, 200, two), (130, 260, (0, 2))])  # another CPU than before: no answer
    assert threads.FreeCores(lambda: next(readings)).measure(least=0) is None


def test_free_cores_of_this_box_are_between_none_and_all() -> None:
    free = threads.FreeCores().measure(least=0.05)
    if free is None:
        pytest.skip("no /proc/stat here")
    assert 0 <= free <= len(os.sched_getaffinity(0))


def test_the_warm_up_uses_the_workers_threads_only_when_nothing_stands_in_its_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oneDNN keeps a kernel per thread count: a warm-up on one thread warms nothing the workers'
    two use (and both sets stay in memory). So the workers' count, unless requests may be served
    meanwhile (a voice is active), or the cores are busy or their use unknown. The cores are only
    measured when it matters (the measurement waits)."""
    from ttsd.serving.loader import warm_cores

    monkeypatch.setattr(threads, "_process_threads", 2)
    asked: list[bool] = []

    def free(value: float | None):  # noqa: ANN202
        return lambda: asked.append(True) or value

    assert warm_cores(free(1.0), live=False) == (2, "the cores are free (1.0 of 2 idle)")
    assert warm_cores(free(0.6), live=False)[0] == 2
    assert warm_cores(free(0.2), live=False) == (1, "the cores are busy (0.2 of 2 idle)")
    assert warm_cores(free(None), live=False) == (1, "the cores' use cannot be read")
    asked.clear()
    assert warm_cores(free(1.0), live=True) == (1, "requests may be served meanwhile")
    monkeypatch.setattr(threads, "_process_threads", 1)
    assert warm_cores(free(1.0), live=False) == (1, "one thread serves")
    assert asked == []  # neither needed the measurement


class _Recording:
    """An engine that notes the thread count its load and warm-up ran on."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def load(self) -> None:
        self.seen["load"] = torch.get_num_threads()

    def warmup(self) -> None:
        self.seen["warmup"] = torch.get_num_threads()

    def unload(self) -> None:
        pass


def _load_on_a_fresh_thread(monkeypatch: pytest.MonkeyPatch, options: dict[str, object], live: bool,
                            free: float, engine: _Recording | None = None) -> dict[str, int]:
    from ttsd.serving import loader

    engine = engine or _Recording()
    monkeypatch.setattr(loader, "create_engine", lambda *_a, **_k: engine)

    class Free:
        def measure(self) -> float:
            return free

    monkeypatch.setattr(loader, "FreeCores", Free)
    calls: list[object] = []
    manifest = SimpleNamespace(name="voice", version="1")

    def job() -> None:  # on a fresh thread, as jobs run
        try:
            loader.load_engine(Path("unused"), manifest, options,  # type: ignore[arg-type]
                               warming=lambda: calls.append("warming"), live=lambda: live)
        except Exception as exc:  # noqa: BLE001 - shown by the assert below
            calls.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert calls == ["warming"]
    return engine.seen


@pytest.mark.parametrize(("live", "free", "warm"), [(False, 1.0, 2), (True, 1.0, 1), (False, 0.1, 1)])
def test_load_engine_loads_on_one_thread_and_warms_on_what_was_decided(
    monkeypatch: pytest.MonkeyPatch, live: bool, free: float, warm: int
) -> None:
    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    torch.set_num_threads(2)  # the workers' count here (the fixture puts back the test worker's)
    monkeypatch.setattr(threads, "_process_threads", 2)
    assert _load_on_a_fresh_thread(monkeypatch, {}, live, free) == {"load": 1, "warmup": warm}


def test_the_first_load_warms_on_the_threads_option_not_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's first load is where ``--threads`` first reaches torch. It used to do so inside the
    load's one-thread block, which then put back the default on the job thread: the warm-up ran on
    the default count, not the workers' (``--threads 1`` on 2 cores warmed on 2)."""
    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    torch.set_num_threads(2)  # torch's default here, as on a 2-core box
    monkeypatch.setattr(threads, "_process_threads", None)  # no load yet in this process
    monkeypatch.setattr(threads, "_asked_threads", None)
    assert _load_on_a_fresh_thread(monkeypatch, {"threads": 1}, False, 1.0) == {"load": 1, "warmup": 1}


class _RecordingServing(_Recording):
    """Notes too the count its load and warm-up take for the workers' (``process_count``)."""

    def load(self) -> None:
        super().load()
        self.seen["workers at load"] = threads.process_count()

    def warmup(self) -> None:
        super().warmup()
        self.seen["workers at warm-up"] = threads.process_count()


@pytest.mark.parametrize("options", [{}, {"threads": 2}, {"threads": 1}])
def test_a_load_and_its_warm_up_on_one_thread_know_the_workers_count(monkeypatch: pytest.MonkeyPatch,
                                                                     options: dict[str, object]) -> None:
    """The workers run on ``--threads``, else on torch's default. Without the option (the default)
    a load (on one thread) and a warm-up beside live requests (one thread) read their own count as
    the workers': the engine chose its kernel paths for one thread and built the decoder's kernels on
    one, which the workers' two threads cannot use (on a busy Zen 3 box, bench/busy.py: drop ->
    active 6.39 s against 5.15 after the fix, a rollback to an unloaded version 2.23 against 1.72,
    medians)."""
    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    torch.set_num_threads(2)  # torch's default here, as on a 2-core box
    monkeypatch.setattr(threads, "_process_threads", None)  # no load yet in this process
    monkeypatch.setattr(threads, "_asked_threads", None)
    workers = int(options.get("threads", 2))  # type: ignore[call-overload]
    seen = _load_on_a_fresh_thread(monkeypatch, options, True, 1.0, _RecordingServing())
    assert seen == {"load": 1, "workers at load": workers, "warmup": 1, "workers at warm-up": workers}


def test_waiting_for_the_counts_can_be_called_off() -> None:
    """The wait for ``/proc/stat``'s counts is in short sleeps, so a paced job that is called off
    (a rollback during an upgrade) stops within one of them, not after the whole wait."""
    from ttsd.serving.pacing import Superseded, Ticket, paced

    ticket, free = Ticket("upgrade"), threads.FreeCores(lambda: (0, 1, (0,)))
    threading.Timer(0.05, lambda: ticket.cancel("a rollback")).start()
    started = time.monotonic()
    with pytest.raises(Superseded), paced(ticket, lambda: False):
        free.measure(least=5.0)
    assert time.monotonic() - started < 1.0


# -- a request's thread count on a busy box (ttsd.front.synth) ---------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _busy_reader(box: list[tuple[int, int]], clock: _Clock, cpus: tuple[int, ...] = (0, 1)) -> threads.BusyElsewhere:
    """A ``BusyElsewhere`` over counts a test steps by hand: ``box`` holds (ticks other programs ran,
    ticks this process ran) per tick of the clock, one entry each 0.05 s, 10 ticks a CPU each."""
    state = {"idle": 0, "all": 0, "own": 0}

    def step() -> None:
        others, own = box.pop(0) if box else (0, 0)
        total = 10 * len(cpus)
        state["all"] += total
        state["idle"] += total - others - own
        state["own"] += own

    def read() -> threads.Ticks:
        step()
        return (state["idle"], state["all"], cpus)

    return threads.BusyElsewhere(read, lambda: state["own"], clock)


def test_busy_elsewhere_counts_other_programs_not_this_one() -> None:
    """Busy ticks on the CPUs less this process's own, over the last quarter of a second: one core
    kept busy by another program reads 1.0; this process busy on both reads 0; none until two
    readings; counts read at most every 0.05 s."""
    clock = _Clock()
    box = [(10, 0)] * 8 + [(0, 20)] * 8  # 0.4 s: another program on one core; then 0.4 s: only this one
    busy = _busy_reader(box, clock)
    assert busy.cores() is None  # one reading
    seen = []
    for _ in range(16):
        clock.now += 0.05
        seen.append(busy.cores())
    assert seen[6] == pytest.approx((1.0, 2))
    assert seen[-1] == pytest.approx((0.0, 2))
    left = len(box)
    clock.now += 0.01
    busy.cores()
    assert len(box) == left  # too soon: not read again


def test_busy_elsewhere_starts_again_when_the_cpus_change_and_gives_none_where_unreadable() -> None:
    clock = _Clock()
    cpus = [(0, 1)]
    ticks = iter(range(0, 10_000, 20))

    def read() -> threads.Ticks:
        n = next(ticks)
        return (0, n, cpus[0])  # every tick busy, none of it this process's: all CPUs busy elsewhere

    busy = threads.BusyElsewhere(read, lambda: 0, clock, running=lambda: 2)  # others runnable now
    busy.cores()
    clock.now += 0.3
    assert busy.cores() == pytest.approx((2.0, 2))
    cpus[0] = (0, 1, 2, 3)  # the process was moved: the old readings say nothing of the new CPUs
    clock.now += 0.3
    assert busy.cores() == pytest.approx((2.0, 2))  # the last answer, until a new pair of readings
    clock.now += 0.3
    assert busy.cores() == pytest.approx((4.0, 4))
    assert threads.BusyElsewhere(lambda: None, lambda: 0, clock).cores() is None
    assert threads.BusyElsewhere(lambda: (0, 1, (0,)), lambda: None, clock).cores() is None


def test_a_program_that_ran_while_nobody_looked_and_stopped_does_not_count() -> None:
    """Between requests nothing is read: the first answer of a request covers the whole stretch
    since the last one. A program that kept both cores busy for most of it and stopped before the
    request (a voice assistant's speech-to-text, just before the answer) counts only while a thread
    of another program is runnable at that instant; from 0.1 s into the request the request's own counts
    decide, whatever was runnable."""
    clock = _Clock()
    counts = {"idle": 0, "all": 0}
    running = [0]

    def elapse(seconds: float, others: float) -> None:  # ``others`` cores busy elsewhere meanwhile
        ticks = round(seconds * 100) * 2
        counts["all"] += ticks
        counts["idle"] += ticks - round(seconds * 100 * others)
        clock.now += seconds

    def busy_after_a_burst() -> threads.BusyElsewhere:
        busy = threads.BusyElsewhere(lambda: (counts["idle"], counts["all"], (0, 1)), lambda: 0, clock,
                                     running=lambda: running[0])
        for _ in range(6):  # the last request: read every 0.05 s, nothing else running
            busy.cores()
            elapse(0.05, 0.0)
        elapse(0.6, 2.0)  # the other program on both cores, then it stops
        elapse(0.3, 0.0)
        return busy

    busy = busy_after_a_burst()
    assert busy.cores() == pytest.approx((0.0, 2))  # no other program runnable now: the burst is over
    running[0] = 2
    busy = busy_after_a_burst()
    stale = busy.cores()
    assert stale is not None and stale[0] > 1.0  # another thread runnable now: the stretch's load holds
    elapse(0.06, 0.0)
    still = busy.cores()
    assert still is not None and still[0] > 1.0  # 0.06 s of its own counts: too few, the stretch holds
    elapse(0.06, 0.0)
    assert busy.cores() == pytest.approx((0.0, 2))  # 0.1 s of the request's own counts: quiet
    running[0] = 0
    busy = busy_after_a_burst()
    busy.cores()
    for _ in range(2):  # a program that starts with the request: seen 0.1 s in
        elapse(0.06, 1.0)
        seen = busy.cores()
    assert seen == pytest.approx((1.0, 2))


def test_a_long_step_of_a_request_is_not_a_stretch_nobody_watched() -> None:
    """A request whose steps are whole sentences reads the counts less often than the span: this
    process ran meanwhile, so the counts are the request's own and hold whatever is runnable at the
    instant (a program busy most of the time may be asleep just then). Two idle stretches among
    the readings kept: the last one is what the answer is judged against."""
    clock = _Clock()
    counts = {"idle": 0, "all": 0, "own": 0}

    def elapse(seconds: float, others: float, own: float) -> None:  # cores busy elsewhere and here
        ticks = round(seconds * 100)
        counts["all"] += 2 * ticks
        counts["idle"] += 2 * ticks - round(ticks * others) - round(ticks * own)
        counts["own"] += round(ticks * own)
        clock.now += seconds

    busy = threads.BusyElsewhere(lambda: (counts["idle"], counts["all"], (0, 1)), lambda: counts["own"], clock,
                                 running=lambda: 0)  # nothing else runnable at any reading
    busy.cores()
    for _ in range(3):  # steps of 0.4 s, this process on one core, another program on the other
        elapse(0.4, 1.0, 1.0)
        assert busy.cores() == pytest.approx((1.0, 2))
    elapse(1.0, 2.0, 0.0)  # idle: another program on both cores, then it stops
    assert busy.cores() == pytest.approx((0.0, 2))
    elapse(0.4, 0.0, 1.0)  # a long step: the request's own counts, quiet
    assert busy.cores() == pytest.approx((0.0, 2))
    elapse(2.0, 2.0, 0.0)  # a second idle stretch, with the first still among the readings kept
    assert busy.cores() == pytest.approx((0.0, 2))


def test_runnable_elsewhere_is_procs_running_less_this_process_s_running_threads(tmp_path: Path) -> None:
    stat, tasks = tmp_path / "stat", tmp_path / "task"
    stat.write_text("cpu  1 2 3 4\nctxt 10\nprocs_running 3\nprocs_blocked 0\n")
    for tid, state in ((10, "R"), (11, "S"), (12, "R")):
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (a (name) R) {state} 1 2 3\n")
    assert threads.runnable_elsewhere(stat, tasks) == 1  # 3 on the box, 2 of them this process's
    stat.write_text("cpu  1 2 3 4\nprocs_running 1\n")
    assert threads.runnable_elsewhere(stat, tasks) == 0  # the caller alone
    stat.write_text("cpu  1 2 3 4\nprocs_running 2\n")
    assert threads.runnable_elsewhere(stat, tasks) == 0  # two of this process's threads
    stat.write_text("cpu  1 2 3 4\n")
    assert threads.runnable_elsewhere(stat, tasks) is None
    assert threads.runnable_elsewhere(tmp_path / "missing", tasks) is None
    assert threads.runnable_elsewhere() is not None  # this box's


def test_own_ticks_read_this_process_and_survive_a_name_with_spaces(tmp_path: Path) -> None:
    assert (threads.own_ticks() or 0) > 0  # this test's own process has run
    stat = tmp_path / "stat"
    stat.write_text("42 (ttsd serve) x) R 1 2 3 4 5 6 7 8 9 10 111 222 13 14\n")
    assert threads.own_ticks(stat) == 333
    stat.write_text("42 (short\n")
    assert threads.own_ticks(stat) is None


@pytest.mark.parametrize(
    ("wanted", "busy", "count"),
    [
        (2, None, 2),  # unknown: as configured
        (2, (0.0, 2), 2),
        (2, (0.4, 2), 2),  # a quarter-to-half busy core: two threads still win
        (2, (0.6, 2), 1),
        (2, (1.0, 2), 1),
        (2, (2.0, 2), 1),  # never none
        (4, (1.0, 4), 3),
        (4, (0.3, 4), 4),
        (1, (2.0, 2), 1),
        (2, (0.0, 8), 2),  # never more than configured
    ],
)
def test_threads_for_load(wanted: int, busy: tuple[float, int] | None, count: int) -> None:
    assert threads.threads_for_load(wanted, busy) == count


class _Said:
    """A ``BusyElsewhere`` that says what the test tells it."""

    def __init__(self, *answers: tuple[float, int] | None) -> None:
        self.answers = list(answers)

    def cores(self) -> tuple[float, int] | None:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_load_threads_follows_the_box_step_by_step_and_puts_the_counts_back() -> None:
    """Each step runs on the count the box allows when it starts; OpenMP's and MKL's counts of the
    thread are what they were once the block ends, even when it ends by an exception."""
    lib = threads._openmp()
    if lib is None:
        pytest.skip("needs an OpenMP runtime")
    torch.set_num_threads(2)  # also gives this thread an MKL count of its own
    mkl = threads._mkl_local()
    mkl_before = mkl(0) if mkl else None
    if mkl is not None and mkl_before is not None:
        mkl(mkl_before)

    def steps():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield (torch.get_num_threads(), mkl_count())

    def mkl_count() -> int | None:
        if mkl is None:
            return None
        now = mkl(0)
        mkl(now)
        return now

    said = _Said((0.0, 2), (1.0, 2), (1.0, 2), (0.1, 2))
    with threads.load_threads(steps(), said) as stream:  # type: ignore[arg-type]
        seen = list(stream)
    one = 1 if mkl else None
    assert seen == [(2, mkl_before), (1, one), (1, one), (2, 2 if mkl else None)]
    assert stream.counts == [2, 1, 1, 2]
    assert (torch.get_num_threads(), mkl_count()) == (2, mkl_before)
    with pytest.raises(ZeroDivisionError), threads.load_threads(iter([1, 2]), _Said((1.0, 2))) as stream:  # type: ignore[arg-type]
        for _ in stream:
            assert torch.get_num_threads() == 1
            raise ZeroDivisionError
    assert (torch.get_num_threads(), mkl_count()) == (2, mkl_before)


def test_load_threads_logs_a_change_once_not_per_request(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_noted", [float("-inf"), None, False])
    caplog.set_level("DEBUG", logger="ttsd.engines")

    def request(*answers: tuple[float, int]) -> None:
        with threads.load_threads(iter(range(len(answers))), _Said(*answers)) as stream:  # type: ignore[arg-type]
            list(stream)

    request((0.0, 2))
    request((1.0, 2), (1.0, 2))
    request((1.0, 2))
    request((1.0, 2), (0.0, 2))
    request((1.0, 2), (0.0, 2))  # a load that comes and goes, within the minute
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    busy, free = ("synthesizing on 1 of 2 threads: other programs keep the cores busy",
                  "synthesizing on all 2 threads again: the cores are free")
    # the way back is at info after a drop said at info: the last info line is never left saying fewer
    assert said == [("INFO", busy), ("INFO", free), ("DEBUG", busy), ("DEBUG", free)]


def test_a_request_runs_on_fewer_threads_while_other_programs_keep_the_cores_busy() -> None:
    """The synthesis pool runs each request through ``load_threads``: beside a program that keeps a
    core busy, a request on a 2-thread worker runs on one (a team of two waits at every barrier for
    the thread the scheduler took away); on a quiet box, on two."""
    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    import numpy as np

    from ttsd.audio import Audio
    from ttsd.front.synth import Job, SynthesisPool
    from ttsd.metrics import Metrics
    from ttsd.options import SynthesisOptions

    class Engine:
        def __init__(self) -> None:
            self.counts: list[int] = []

        def check_options(self, options: SynthesisOptions) -> SynthesisOptions:
            return options

        def synthesize_stream(self, text: str, options: SynthesisOptions, **_: object):  # type: ignore[no-untyped-def]
            for _ in range(3):
                self.counts.append(torch.get_num_threads())
                yield Audio(np.full(160, 0.5, dtype=np.float32), 16000)

    class Lease:
        def __init__(self) -> None:
            self.engine, self.voice = Engine(), SimpleNamespace(name="voice", version="1")

        def release(self, ok: bool | None = None) -> None:
            pass

    torch.set_num_threads(2)  # the workers' count (the pool's thread takes it at its first op)
    counts = {}
    for case, busy in (("busy", (1.0, 2)), ("quiet", (0.0, 2))):
        pool = SynthesisPool(workers=1, queue_size=1, metrics=Metrics.create(), busy=_Said(busy))  # type: ignore[arg-type]
        lease = Lease()
        job = Job(text="hello", options=SynthesisOptions(), lease=lease, route="test")  # type: ignore[arg-type]
        assert pool.submit(job).result(10).audio_seconds == pytest.approx(0.03)
        pool.shutdown()
        counts[case] = lease.engine.counts
    assert counts == {"busy": [1, 1, 1], "quiet": [2, 2, 2]}


def test_say_in_process_runs_on_fewer_threads_while_other_programs_keep_the_cores_busy(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ttsd say`` with no daemon speaks through ``load_threads`` too: a busy box gets the speech
    on one thread of ``--threads 2``, and the audio is written."""
    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    from ttsd.cli.say import Speech, _in_process
    from ttsd.options import SynthesisOptions

    for name, value in (("TTSD_CACHE", "cache"), ("TTSD_MODELS", "models"), ("TTSD_STATE", "state")):
        monkeypatch.setenv(name, str(tmp_path / value))
    monkeypatch.setattr(threads, "_process_threads", threads._process_threads)  # --threads 2 below sets it
    monkeypatch.setattr(threads.BUSY, "cores", lambda: (1.0, 2))
    counts: list[tuple[int, int]] = []
    monkeypatch.setattr(threads, "_note", lambda count, wanted: counts.append((count, wanted)))
    out = tmp_path / "out.wav"
    speech = Speech("Hello there. And again.", str(out), "wav", None, SynthesisOptions(seed=1))
    _in_process(speech, model_dir=tiny_folder, models_dir=None, max_chars=1000, threads=2, precision="fp32")
    assert counts and set(counts) == {(1, 2)}
    assert out.stat().st_size > 44


def test_a_piece_on_one_thread_is_the_audio_two_threads_make(tiny_folder: Path) -> None:
    """``load_threads`` may run any piece of a request on one thread: fp32 audio must not depend on
    it beyond the engine's fp32 tolerance (1e-4), so a busy box changes the speed, not the sound."""
    if threads._openmp() is None:
        pytest.skip("needs an OpenMP runtime")
    import numpy as np

    from ttsd.audio import concat
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine

    torch.set_num_threads(2)
    engine = open_engine(tiny_folder, precision="fp32")
    text, options = "Hello there. A second sentence, a little longer than the first.", SynthesisOptions(seed=4)
    two = concat(list(engine.synthesize_stream(text, options, pieces=True))).samples
    with threads.load_threads(engine.synthesize_stream(text, options, pieces=True), _Said((2.0, 2))) as steps:
        one = concat(list(steps)).samples
    assert steps.counts and set(steps.counts) == {1}
    assert one.shape == two.shape and np.allclose(one, two, atol=1e-4)


def test_load_threads_closes_the_stream_on_its_thread_when_a_request_stops_early() -> None:
    """A request stopped mid-stream (cancelled, a client gone, an error) closes its stream when the
    block ends, as a plain ``for`` did: an exception's traceback keeps the caller's frame, and a
    suspended stream holds the model's tensors (an unloaded version's memory would wait for it)."""
    closed: list[str] = []

    def stream():  # type: ignore[no-untyped-def]
        try:
            yield 1
            yield 2
        finally:
            closed.append(threading.current_thread().name)

    caught, held = None, stream()  # held: a caller's own reference does not keep it open
    try:
        with threads.load_threads(held, _Said((0.0, 2))) as steps:  # type: ignore[arg-type]
            for _ in steps:
                raise KeyError("stop")
    except KeyError as exc:
        caught = exc  # kept, as the executor's Future keeps a failed job's exception
    assert caught is not None and closed == [threading.current_thread().name]


def test_nothing_here_imports_torch_and_threads_asked_for_before_it_wait_for_it() -> None:
    """An engine that does not use torch (a plugin's; the tests' fake) never has torch imported for
    it: until an engine imports torch every helper is a no-op, and ``--threads`` is given to torch
    at the next load after it is."""
    import subprocess
    import sys

    code = """
import sys
from ttsd.engines import threads
threads.process_threads(1)
with threads.thread_cores(1):
    pass
with threads.load_threads(iter([1, 2])) as steps:
    assert list(steps) == [1, 2] and steps.counts == []
assert threads.process_count() == 1
assert "torch" not in sys.modules, "imported torch"
import torch
assert torch.get_num_threads() > 1, "the test needs 2 cores"
threads.process_threads(1)
assert torch.get_num_threads() == 1 and threads.process_count() == 1
assert threads._openmp() is not None  # looked up now that torch is imported, not left unfound
"""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert run.returncode == 0, run.stderr


@pytest.mark.daemon
def test_a_daemon_whose_voices_do_not_use_torch_never_loads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its start-up, requests (whole and streamed), status and metrics: no torch library mapped."""
    from daemon_util import fake_daemon_model, fake_site, start_daemon

    monkeypatch.setenv("PYTHONPATH", fake_site(tmp_path))
    fake_daemon_model(tmp_path / "models" / "fake-1", "1")
    d = start_daemon(tmp_path, tmp_path / "cache", "--no-seed")
    for path in ("/v1/status", "/v1/voices", "/metrics", "/"):
        assert d.get(path).status == 200, path
    assert d.post("/v1/synthesize", {"text": "Hello there."}).status == 200
    assert d.post("/v1/synthesize", {"text": "Hello there. And more.", "stream": True}).status == 200
    assert d.post("/v1/audio/speech", {"input": "Hello there.", "model": "tts-1", "voice": "fake"}).status == 200
    mapped = Path(f"/proc/{d.pid}/maps").read_text()
    assert "libtorch" not in mapped and "libgomp" not in mapped
    assert d.stop() == 0, d.logs()


def test_the_workers_count_before_torch_is_imported_where_affinity_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not Linux (no ``os.sched_getaffinity``): the CPU count, not an AttributeError that refused the load."""
    monkeypatch.setattr(threads, "_torch_loaded", lambda: False)
    monkeypatch.setattr(threads, "_process_threads", None)
    monkeypatch.setattr(threads, "_asked_threads", None)
    monkeypatch.delattr(os, "sched_getaffinity")
    assert threads.process_count() == (os.cpu_count() or 1)
