"""Converting voices from other formats into files the ``vits`` engine serves: a Piper voice (ONNX +
JSON) becomes a transformers VITS folder (``piper_import``), built on the ``VitsModel`` variant that
Piper's voices need (``piper_vits``). Serving never imports this package; it is the only part of
``ttsd`` that imports transformers.
"""
