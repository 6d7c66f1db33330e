"""Drive a real ``ttsd serve`` from tests, benchmarks and scripts (like ``aiohttp.test_utils``):
``Daemon`` (``daemon.py``) and the measuring helpers of ``probes.py``. Standard library only (and
``prometheus_client`` lazily, for ``Daemon.metric``): importing this must stay as cheap as the CLI."""

from ..client import UnixHTTPConnection
from .daemon import Daemon, HarnessError
from .probes import Reply, WaitTimeout, cpu_name, pct, request, rss_mb, wait_for

__all__ = [
    "Daemon",
    "HarnessError",
    "Reply",
    "UnixHTTPConnection",
    "WaitTimeout",
    "cpu_name",
    "pct",
    "request",
    "rss_mb",
    "wait_for",
]
