"""Reference implementations the tests compare ttsd against (they import transformers)."""
