"""What each part of the bf16 path buys: an A/B of the vits engine with bf16 in the prior flow only,
in the decoder only, in both, and in neither (fp32), on the built-in voice.

Each variant runs in its own fresh process (``steps.py --child VARIANT``), the variants alternating
round after round so they share the machine's noise: the process loads the voice, builds the
variant by taking the flow and the decoder from an fp32 or a bf16 load, warms up (2 runs), and
times ``--runs`` syntheses of the paragraph of ``bench/rtf.py`` (noise on, seeded), reporting the
median of the text side (encoder, durations, flow) and of the decoder. The table shows the median
over rounds of each, and each variant's total against fp32's. The bf16 variants need a CPU with
native bf16 (elsewhere bf16 is emulated and their figures mean nothing); without it only fp32 runs,
which still splits the paragraph's time between the text side and the decoder.

Run from the repository root::

    .venv/bin/python bench/steps.py [--rounds 4] [--runs 5] [--threads 2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> (flow in bf16, decoder in bf16)
    "fp32": (False, False),
    "bf16 flow": (True, False),
    "bf16 decoder": (False, True),
    "bf16": (True, True),
}


def child(variant: str, cache: Path, threads: int, runs: int) -> dict[str, float]:
    import torch

    from ttsd.engines.vits.model import NativeVits
    from ttsd.malloc import tune
    from ttsd.options import SynthesisOptions
    from ttsd.speak import open_engine
    from ttsd.voices import builtin_model

    tune()
    sys.path.insert(0, str(Path(__file__).parent))
    from rtf import PARAGRAPH

    engine = open_engine(builtin_model(cache), threads=threads, precision="fp32")
    flow_bf16, decoder_bf16 = VARIANTS[variant]
    if flow_bf16 or decoder_bf16:
        fp32 = engine.model
        bf16 = NativeVits(engine.folder, dtype=torch.bfloat16)
        mixed = NativeVits.__new__(NativeVits)
        mixed.__dict__.update(fp32.__dict__)
        mixed.flows = bf16.flows if flow_bf16 else fp32.flows
        mixed.decoder = bf16.decoder if decoder_bf16 else fp32.decoder
        engine.model = mixed
    options = SynthesisOptions(seed=1, sentence_pause=0.0)
    units = engine._units(PARAGRAPH, options)

    def once() -> tuple[float, float]:
        text = decode = 0.0
        for unit in units:
            started = time.perf_counter()
            latents, speaker = engine._latents(unit, options)
            middle = time.perf_counter()
            with torch.inference_mode():
                engine.model.decoder(latents, speaker)
            text += middle - started
            decode += time.perf_counter() - middle
        return text, decode

    for _ in range(2):
        once()
    timed = [once() for _ in range(runs)]
    return {"text_s": statistics.median(t for t, _ in timed), "decoder_s": statistics.median(d for _, d in timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="fresh processes per variant (default 4)")
    parser.add_argument("--runs", type=int, default=5, help="timed paragraphs per process (default 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="ttsd cache dir (default $TTSD_CACHE or a temp dir)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    env_cache = os.environ.get("TTSD_CACHE")
    cache: Path = args.cache or (Path(env_cache) if env_cache else Path(tempfile.gettempdir()) / "ttsd-bench-cache")
    if args.child:
        print(json.dumps(child(args.child, cache, args.threads, args.runs)))
        return
    from ttsd.engines.precision import native_bf16
    from ttsd.testing import cpu_name

    # without native bf16 (emulated: slower than fp32, and oneDNN's bf16 convolutions refuse AVX2-only
    # CPUs) only the fp32 split of the paragraph's time between the text side and the decoder
    names = list(VARIANTS) if native_bf16() else ["fp32"]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for index in range(args.rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order if index % 2 == 0 else order[::-1]:
            cmd = [sys.executable, __file__, "--child", name, "--cache", str(cache), "--threads", str(args.threads),
                   "--runs", str(args.runs)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {index + 1}/{args.rounds}: {name} {results[name][-1]}", file=sys.stderr, flush=True)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("text_s", "decoder_s")}
              for name, rs in results.items()}
    base = median["fp32"]["text_s"] + median["fp32"]["decoder_s"]
    print(f"`{command}`\n\n{cpu_name()}, {args.threads} threads, the paragraph of "
          f"bench/rtf.py; median over {args.rounds} fresh processes of each one's median of {args.runs} runs"
          + ("" if len(names) > 1 else "; this CPU has no native bf16: fp32 only") + "\n")
    print("| variant | text side (s) | decoder (s) | total (s) | total / fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name, m in median.items():
        total = m["text_s"] + m["decoder_s"]
        print(f"| {name} | {m['text_s']:.3f} | {m['decoder_s']:.3f} | {total:.3f} | {total / base:.2f}x |")


if __name__ == "__main__":
    main()
