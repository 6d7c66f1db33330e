"""Which version of each voice serves: the source of model folders (``source``), the watcher
that says when to look again (``watcher``), the private store and saved state (``store``,
``state``), the versions and their states (``versions``), the loader (``loader``), the map requests
are served from (``serving_map``), and the manager that decides (``manager``, ``actions``, and
within a memory budget ``demand``, whose policy is ``residency``).

Front ends import ``serving_map`` only; the daemon wires the rest.
"""
