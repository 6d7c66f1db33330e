"""What the conformance tests and benches ask of a loaded ``VitsEngine`` besides synthesis: the
model ids it would synthesize per unit, and the raw model output for given ids. Kept out of the
engine because serving never needs them; bench/ scripts import this module as
``tests.vits_helpers``, with the repository root on ``sys.path``.
"""

from __future__ import annotations

import numpy as np

from ttsd.engines.vits.engine import Unit, VitsEngine
from ttsd.options import SynthesisOptions


def render_ids(engine: VitsEngine, ids: list[int], options: SynthesisOptions | None = None) -> np.ndarray:
    """Raw model output for given ids, without normalisation."""
    return engine._render(Unit(ids), (options or SynthesisOptions()).checked())


def phoneme_ids(engine: VitsEngine, text: str) -> list[list[int]]:
    """The ids per unit (sentence, or piece of an over-long one) the engine would synthesize."""
    return [unit.ids for unit in engine._units(text, SynthesisOptions())]
