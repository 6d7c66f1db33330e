"""ttsd: a text-to-speech daemon for small, offline, CPU-only boxes."""

__version__ = "0.1.0"
