"""Room: engine. One supervisor per engine and what it drives.

``supervisor`` (the only writer of an engine's state: typed inbox, transition table),
``health`` (the watchdog: probes -> ``policies.health`` verdicts), ``episodes``, ``process``
(spawn, adopt, signal, reap), ``keeper`` (the engine's parent that records its exit), ``scopes`` (systemd scopes) and ``adapters`` (per-engine facts).
Nothing here imports the daemon: the supervisor depends on the ``SupervisorHost`` protocol.
"""
