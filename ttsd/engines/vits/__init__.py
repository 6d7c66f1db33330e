"""The ``vits`` engine: VITS voices (Hugging Face checkpoints and converted Piper voices) on torch,
CPU, without transformers. The engine class is ``engine.VitsEngine`` (the registry in
``ttsd.engines`` names it); this package's modules import torch, so nothing outside it should
import them just to look around. This file imports nothing, so ``phonemes`` and ``chars`` can be
imported on their own.
"""
