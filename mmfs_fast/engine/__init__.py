"""The inference engine (:class:`Engine`) and its parts: static-shape execution, style
caches, micro-batching and CPU memory tuning; :class:`PlainRenderer`, the plain Stylizer
behind the same rendering interface (the reference path)."""
from mmfs_fast.engine.cache import LRUCache
from mmfs_fast.engine.engine import Engine
from mmfs_fast.engine.memory import retain_freed_cpu_memory
from mmfs_fast.engine.plain import PlainRenderer

__all__ = ["Engine", "LRUCache", "PlainRenderer", "retain_freed_cpu_memory"]
