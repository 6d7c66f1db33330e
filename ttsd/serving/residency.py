"""The memory budget for loaded voices: which loaded versions to unload so that one more fits.

Pure policy, no torch and no threads: the manager (``demand.py``) describes what is loaded, how
busy and how recently used, and what each version cost when it loaded (measured RSS, not guessed
from file sizes); ``plan`` answers which versions to unload, in order, and whether the budget is
then met. A least-recently-used cache, with two rules of its own:

* a version that is busy is never chosen: a request holds it or waits for it, it is a canary, or it
  is the active version of the voice being loaded; nor is the active version of a preloaded
  (pinned) voice;
* rollback targets (loaded versions that are not their voice's active one) go first, least
  recently used first; then the active versions of idle voices, least recently used first.

A budget is a count of loaded versions (``max_loaded``), the process's resident memory
(``memory``, bytes), or both; without either nothing is ever unloaded by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Key = tuple[str, str]  # (voice, normalised version)


@dataclass(frozen=True)
class Budget:
    max_loaded: int | None = None  # loaded versions, rollback targets and canaries included
    memory: int | None = None  # bytes of the whole process's RSS
    preload: tuple[str, ...] = ()  # voices kept loaded (empty: the default voice)
    wait: float = 30.0  # seconds a request waits for its voice to load

    @property
    def limited(self) -> bool:
        return self.max_loaded is not None or self.memory is not None

    def fits(self, count: int, rss: int) -> bool:
        return (self.max_loaded is None or count <= self.max_loaded) and (self.memory is None or rss <= self.memory)


@dataclass(frozen=True)
class Resident:
    """One loaded version, as the policy sees it."""

    key: Key
    active: bool  # its voice's active version (else a rollback target)
    busy: bool  # not unloaded now: requests hold or want it (see the module docstring)
    last_used: float  # monotonic time its voice last served a request (0: never)
    cost: int  # RSS bytes its load added (an estimate when it was never measured)
    pinned: bool = False  # never unloaded: the active version of a preloaded voice


@dataclass(frozen=True)
class Plan:
    unload: list[Key]  # in this order
    fits: bool  # whether the budget is met once they are unloaded


def plan(loaded: Sequence[Resident], budget: Budget, *, rss: int, adding: int = 0, adding_bytes: int = 0) -> Plan:
    """What to unload so that ``adding`` more versions, expected to cost ``adding_bytes``, fit
    beside ``loaded`` when the process's RSS is ``rss`` now (``adding=0``: bring what is loaded
    back within the budget). ``fits`` is False when unloading every idle version is not enough;
    ``unload`` then lists all of them (a caller that must not go over unloads nothing)."""
    count, memory = len(loaded) + adding, rss + adding_bytes
    unload: list[Key] = []
    for resident in sorted((r for r in loaded if not (r.busy or r.pinned)), key=lambda r: (r.active, r.last_used)):
        if budget.fits(count, memory):
            break
        unload.append(resident.key)
        count, memory = count - 1, memory - resident.cost
    return Plan(unload, budget.fits(count, memory))


def estimate(costs: Iterable[int]) -> int:
    """The cost expected of a version never loaded in this process: the largest measured so far
    (voices on one box tend to be alike; guessing high unloads one voice too many, guessing low
    goes over the budget). 0 before anything was measured."""
    return max((c for c in costs if c > 0), default=0)


def parse_size(text: str) -> int:
    """``1.5G``, ``800M``, ``512MiB``, ``2GB`` or plain bytes -> bytes (binary units: a box's
    memory is counted in them). ``ValueError`` for anything else."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    factor = units.get(value[-1:], 1)
    number = float(value[:-1] if value[-1:] in units else value)
    if not 0 < number * factor < 1 << 62:  # NaN fails this too
        raise ValueError(f"not a size: {text!r}")
    return int(number * factor)
