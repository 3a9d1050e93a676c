"""lqc.passes: the Pass API, the pass manager, recipes, and the built-in passes."""

from .base import Pass, PassResult
from .context import Calibration, PassContext
from .manager import PassManager
from .options import PassOptions, describe_options
from .recipe import load_recipe, recipe_entries
from .registry import get_pass, register_pass, registered_passes, unregister_pass
from .report import GraphReport, PassRecord, format_summary
from .transform_cache import DEFAULT_CACHE, TransformCache

# Built-in passes register themselves on import.
from . import cleanup, compress_kv, concat_linears, drop_layers, ffn_to_moe, fold_batchnorm, fold_norms, merge_adapters, merge_branches, quantize, rotate  # noqa: E402,F401

__all__ = [
    "Calibration",
    "DEFAULT_CACHE",
    "GraphReport",
    "Pass",
    "PassContext",
    "PassManager",
    "PassOptions",
    "PassRecord",
    "PassResult",
    "TransformCache",
    "describe_options",
    "format_summary",
    "get_pass",
    "load_recipe",
    "recipe_entries",
    "register_pass",
    "registered_passes",
    "unregister_pass",
]
