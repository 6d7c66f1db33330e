"""Pictures of the benchmarks' results: PNG files drawn with matplotlib (the ``bench`` extra).

Called by ``bench/hotswap.py --plot`` and ``bench/rtf.py --plot`` once their measuring is done,
on the results they already hold; nothing here measures. matplotlib is imported only inside
``pyplot()``, so the benches run without it unless a picture is asked for, and ``require()`` lets
them fail before measuring, not after.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

WIDTH_IN, DPI = 8.0, 100  # 800 px wide: readable in the README without scaling
INSTALL = "--plot needs matplotlib: pip install -e '.[bench]' (or pip install matplotlib)"
TTSD_COLOUR, TTSD_BF16_COLOUR, PIPER_COLOUR = "tab:blue", "tab:green", "tab:orange"
RTF_ENGINES = {"ttsd": TTSD_COLOUR, "ttsd-bf16": TTSD_BF16_COLOUR, "piper": PIPER_COLOUR}  # in drawing order


def require() -> None:
    """Raise SystemExit with how to install matplotlib when it is missing (call before measuring)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL) from None


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` as PNG; squeezed with pngquant when it is installed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--quality", "60-95", "--ext", ".png", str(path)],
                       check=False, capture_output=True)


def hotswap(path: Path, samples: list[tuple[float, float, int, str | None]], marks: dict[str, float],
            title: str) -> None:
    """Latency of each request against the time it started, coloured by the version that answered.

    ``samples``: (start, latency s, HTTP status, version) with monotonic starts; ``marks``: monotonic
    times by name - ``began`` (load started: the x origin), ``dropped``, ``verifying`` / ``loading`` /
    ``warming`` (first time /v1/voices showed version 2 so, when a poll caught it), ``active``
    (reported active), ``first_v2`` (first version-2 answer), ``end`` (right edge).
    """
    plt = pyplot()
    origin = marks["began"]
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.2))
    by_version: dict[str, list[tuple[float, float]]] = {}
    for start, latency, status, version in samples:
        if start > marks["end"]:
            continue
        label = f"version {version}" if status == 200 else f"failed ({status or 'no answer'})"
        by_version.setdefault(label, []).append((start - origin, latency * 1e3))
    colours = {"version 1": "tab:blue", "version 2": "tab:green"}
    for label, points in sorted(by_version.items()):
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=9, alpha=0.7, label=f"{label} ({len(points)})",
                   color=colours.get(label, "tab:red"), marker="o" if label in colours else "x")
    lines = [("dropped", "drop", "black", "-"), ("verifying", "verifying", "tab:gray", ":"),
             ("loading", "loading", "tab:purple", ":"), ("warming", "warm-up", "tab:orange", ":"),
             ("active", "reported active", "tab:green", "--"), ("first_v2", "first v2 answer", "tab:olive", "-.")]
    for key, label, colour, style in lines:
        if key in marks and not math.isnan(marks[key]):
            at = marks[key] - origin
            ax.axvline(at, color=colour, linestyle=style, linewidth=1.2, label=f"{label} ({at:.1f} s)")
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("request latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower center", ncol=4, framealpha=0.85)  # latencies sit well above 0
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def rtf(path: Path, result: dict[str, Any], title: str) -> None:
    """Three panels: synthesis time per text, streamed first audio / total, RSS over the soak; every engine
    in ``result`` (ttsd fp32, ttsd bf16 when measured, piper), each in its own colour.

    ``result`` is ``bench/rtf.py``'s result dict (older ones, without ``ttsd-bf16``, too); the soak panel
    needs each memory child's ``rss_mb``.
    """
    plt = pyplot()
    engines = [engine for engine in RTF_ENGINES if engine in result["speed"]["sentence"]]
    both = "ttsd-bf16" in engines and "ttsd" in engines
    labels = {"ttsd": "ttsd fp32" if both else "ttsd", "ttsd-bf16": "ttsd bf16", "piper": "piper"}
    fig, (speed, first, memory) = plt.subplots(1, 3, figsize=(WIDTH_IN, 3.6 if len(engines) < 3 else 4.0),
                                                gridspec_kw={"width_ratios": [1, 1, 1.6]})
    bar = 0.8 / len(engines)  # the group's bars side by side, 0.2 of a slot between groups

    def bars(ax: Any, groups: list[str], values: dict[str, list[float]], unit: str) -> None:
        for i, engine in enumerate(engines):
            xs = [g + (i - (len(engines) - 1) / 2) * bar for g in range(len(groups))]
            drawn = ax.bar(xs, values[engine], bar, color=RTF_ENGINES[engine], label=labels[engine])
            # upright numbers fit over 2 bars per group; over 3 they would run into each other
            ax.bar_label(drawn, fmt="%.2f", fontsize=7 if len(engines) < 3 else 6.5,
                         rotation=0 if len(engines) < 3 else 90, padding=0 if len(engines) < 3 else 2)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.margins(y=0.15 if len(engines) < 3 else 0.3)

    texts = list(result["speed"])
    bars(speed, texts, {e: [result["speed"][t][e]["seconds"] for t in texts] for e in engines}, "seconds")
    speed.set_title("synthesis time", fontsize=9)
    bars(first, ["first audio", "all 4"],
         {e: [result["first_audio"][e]["first_s"], result["first_audio"][e]["total_s"]] for e in engines}, "seconds")
    first.set_title("streamed 4 sentences", fontsize=9)
    for engine in engines:
        rss = result["memory"].get(engine, {}).get("rss_mb") or []
        memory.plot(range(1, len(rss) + 1), rss, color=RTF_ENGINES[engine], linewidth=1.2, label=labels[engine])
    memory.set_title(f"RSS over the soak ({result['soak']} varied requests)", fontsize=9)
    memory.set_xlabel("request", fontsize=8)
    memory.set_ylabel("MB", fontsize=8)
    memory.set_ylim(bottom=0)
    memory.grid(alpha=0.3)
    for ax in (speed, first, memory):
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=9)
    # one legend for the three panels, under them: inside a bar panel it would cover the bars
    handles, names = speed.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(engines), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save(fig, path)
    plt.close(fig)
