"""Sense: each probe does its I/O in one place and returns a typed, timestamped Reading.

Nothing here imports ``supervisord_llm``. Blocking probes are plain functions; the daemon runs
them in a worker thread.
"""
