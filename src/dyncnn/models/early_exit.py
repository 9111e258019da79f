"""Registers the multi-exit wrapper (``multi_exit``) so that exit networks built on any backbone can be created
by name and restored from checkpoints; the code lives in ``dyncnn.dynamic.exits``."""
from ..dynamic import exits  # noqa: F401  (registers "multi_exit")
