"""Room: alerts. Durable delivery of alerts and the heartbeat.

``delivery`` (outbox, webhook formats, signing, Alertmanager) and ``heartbeat`` (the dead-man's
switch). Which episodes alert is decided in ``policies.episodes`` and ``policies.heartbeat``.
"""
