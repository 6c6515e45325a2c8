"""The inference engine (:class:`Engine`) and its parts: static-shape execution, style
caches, micro-batching and CPU memory tuning."""
from mmfs_fast.engine.cache import LRUCache
from mmfs_fast.engine.engine import Engine
from mmfs_fast.engine.memory import retain_freed_cpu_memory

__all__ = ["Engine", "LRUCache", "retain_freed_cpu_memory"]
