"""Room: subsystems. Typed ``Extension``s the daemon composes.

``gpu``, ``stranded``, ``memory_guard``, ``metrics``, ``observe``, ``idle`` and ``ui``: each
implements the hooks it needs and inherits no-op defaults for the rest (no ``hasattr`` probing).
"""
