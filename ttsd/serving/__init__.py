"""Which version of each voice serves.

Looking at the disk: ``source`` (which model folders exist, with a verdict); when to look again is
``ttsd.reloader``'s. What is known: ``table`` (every version's record, the one place records change),
``versions`` (states and records), ``state`` and ``history`` (saved across restarts), ``store``
(the private copies loads come from). Deciding: ``policy`` (pure rules), ``intake`` (what a folder
is), ``manager`` (wires the parts and runs a reconcile). Doing: ``jobs`` (slow work, one job per
voice, called off when superseded) paced by ``pacing``; ``promote`` (what the jobs do) through
``bringup`` (copy, verify, check, load, warm) and ``loader``; ``lifecycle`` (the short, serialized
commits: the swap, canaries, unloads); ``actions`` (rollback, activate); ``demand`` and
``residency`` (the memory budget); ``restore`` (start-up). Serving: ``serving_map``, the one place
requests take a version; ``listing`` (what the API shows of each voice).

Front ends import ``serving_map`` only; the daemon wires the rest.
"""
