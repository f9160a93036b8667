"""Decide: pure, synchronous functions of (readings, history, now) -> Action. No I/O, no logging.

Policies may import reading types from ``probes``; nothing here imports ``supervisord_llm``.
"""
