"""Use ttsd's engine from Python: verify a model folder, load it, stream a paragraph to WAV files.

    python examples/synthesize.py "First sentence. Second sentence." out-dir/

Uses the built-in voice (converted on first use) unless TTSD_MODEL names a model folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ttsd.audio import encode
from ttsd.config import Paths
from ttsd.options import SynthesisOptions
from ttsd.speak import open_engine
from ttsd.voices import builtin_model


def main() -> None:
    text, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(os.environ["TTSD_MODEL"]) if "TTSD_MODEL" in os.environ else builtin_model(Paths.resolve().cache)
    engine = open_engine(folder)
    for index, chunk in enumerate(engine.synthesize_stream(text, SynthesisOptions(speed=1.1))):
        path = out_dir / f"sentence-{index:02d}.wav"
        path.write_bytes(encode(chunk, "wav"))
        print(f"{path}: {chunk.duration:.2f} s")


if __name__ == "__main__":
    main()
