"""The memory budget's policy on its own: plain data in, which versions to unload out."""

from __future__ import annotations

import pytest

from ttsd.serving.residency import Budget, Resident, estimate, parse_size, plan

MB = 1 << 20


def r(voice: str, *, version: str = "1", active: bool = True, busy: bool = False, used: float = 0.0,
      cost: int = 100 * MB) -> Resident:
    return Resident((voice, version), active, busy, used, cost)


def test_no_budget_never_unloads() -> None:
    loaded = [r("a"), r("b"), r("c")]
    assert plan(loaded, Budget(), rss=10 << 30, adding=5) == plan([], Budget(), rss=0)
    assert plan(loaded, Budget(), rss=10 << 30, adding=5).fits


def test_the_least_recently_used_idle_voice_goes_when_one_more_would_not_fit() -> None:
    loaded = [r("a", used=30), r("b", used=10), r("c", used=20)]
    assert plan(loaded, Budget(max_loaded=3), rss=0, adding=1).unload == [("b", "1")]
    assert plan(loaded, Budget(max_loaded=4), rss=0, adding=1).unload == []
    assert plan(loaded, Budget(max_loaded=1), rss=0, adding=1).unload == [("b", "1"), ("c", "1"), ("a", "1")]


def test_rollback_targets_go_first_even_when_used_more_recently() -> None:
    loaded = [r("a", used=1), r("b", used=50), r("b", version="0", active=False, used=50)]
    result = plan(loaded, Budget(max_loaded=3), rss=0, adding=1)
    assert result.unload == [("b", "0")] and result.fits


def test_busy_versions_are_never_chosen_and_then_it_does_not_fit() -> None:
    loaded = [r("a", busy=True, used=1), r("b", used=5)]
    result = plan(loaded, Budget(max_loaded=2), rss=0, adding=1)
    assert result.unload == [("b", "1")] and result.fits
    everything_busy = [r("a", busy=True), r("b", busy=True)]
    result = plan(everything_busy, Budget(max_loaded=2), rss=0, adding=1)
    assert result.unload == [] and not result.fits


def test_memory_budget_counts_measured_costs() -> None:
    """1. 900 MB in use, budget 1 GB, the new voice costs 200 MB: 100 MB too much. 2. The LRU
    voice (150 MB) is enough. 3. A cheap LRU voice (50 MB) is not: the next goes too."""
    loaded = [r("a", used=1, cost=150 * MB), r("b", used=2, cost=300 * MB)]
    budget = Budget(memory=1000 * MB)
    assert plan(loaded, budget, rss=900 * MB, adding=1, adding_bytes=200 * MB).unload == [("a", "1")]
    cheap = [r("a", used=1, cost=50 * MB), r("b", used=2, cost=300 * MB)]
    assert plan(cheap, budget, rss=900 * MB, adding=1, adding_bytes=200 * MB).unload == [("a", "1"), ("b", "1")]
    # the process alone is over the budget: unloading everything idle still does not fit
    result = plan(loaded, Budget(memory=100 * MB), rss=900 * MB, adding=1, adding_bytes=200 * MB)
    assert not result.fits and len(result.unload) == 2


def test_both_limits_apply() -> None:
    loaded = [r("a", used=1, cost=10 * MB), r("b", used=2, cost=10 * MB)]
    budget = Budget(max_loaded=2, memory=1000 * MB)
    assert plan(loaded, budget, rss=100 * MB, adding=1, adding_bytes=10 * MB).unload == [("a", "1")]


def test_trimming_without_a_load_brings_the_count_back() -> None:
    loaded = [r("a", used=3), r("a", version="0", active=False, used=3), r("b", used=1)]
    assert plan(loaded, Budget(max_loaded=2), rss=0).unload == [("a", "0")]
    assert plan(loaded, Budget(max_loaded=3), rss=0).unload == []


def test_estimate_is_the_largest_measured_cost() -> None:
    assert estimate([]) == 0
    assert estimate([0, 0]) == 0
    assert estimate([10, 0, 30, 20]) == 30


@pytest.mark.parametrize("text, size", [("1.5G", 3 << 29), ("800M", 800 * MB), ("512MiB", 512 * MB),
                                        ("2GB", 2 << 30), ("64k", 64 << 10), ("1000000", 1_000_000),
                                        (" 1g ", 1 << 30)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "nan", "inf", "1.5X", "lots", "1e30T"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
