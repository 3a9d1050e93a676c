"""KV-cache compression: the compress_kv pass (its runtime is lqc.runtime.kv)."""

from lqc.passes.kv import compress_kv  # noqa: F401  (registers the pass)
