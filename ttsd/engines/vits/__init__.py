"""The ``vits`` engine: VITS voices (Hugging Face checkpoints and converted Piper voices) on torch,
CPU, without transformers. ``engine.VitsEngine`` is the class the registry in ``ttsd.engines``
names; it runs ``model.NativeVits``, which is built from ``config``, ``weights``, ``text_side`` and
``decoder`` (these import torch), and reads text with ``chars`` (character tokenizers) or
``phonemes`` (Piper's espeak-ng phonemes), which do not. This file imports nothing, so that the
converter (``ttsd.convert``) can take ``phonemes.PHONEMES_FILE`` without importing torch.
"""
