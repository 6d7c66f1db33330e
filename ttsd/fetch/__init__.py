"""Voices from the public Piper catalog (``ttsd models search`` / ``ttsd models get``).

``index``: the catalog (``voices.json``) parsed and checked, and searched. ``download``: the
mirror, bounded fetches and resumable, checked downloads over HTTP(S). ``get``: one voice from
catalog entry to a model folder published in the models dir. Plain data and the standard library,
except the conversion, which ``get`` reaches through ``ttsd.voices.import_piper``.
"""
