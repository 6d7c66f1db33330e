"""The watcher of the models dir (``ttsd.serving.watcher``), under the name the owner's layout
gives it."""

from .serving.watcher import ModelWatcher

__all__ = ["ModelWatcher"]
