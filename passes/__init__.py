"""lqc.passes: the Pass API, the pass manager, recipes, and the built-in passes."""

from lqc.passes.base import Pass, PassResult
from lqc.passes.context import Calibration, PassContext
from lqc.passes.manager import PassManager
from lqc.passes.options import PassOptions, describe_options
from lqc.passes.recipe import load_recipe, recipe_entries
from lqc.passes.registry import get_pass, register_pass, registered_passes, unregister_pass
from lqc.passes.report import GraphReport, PassRecord, format_summary
from lqc.passes.transform_cache import DEFAULT_CACHE, TransformCache

# Built-in passes register themselves on import.
from lqc.passes import kv, lowrank, quantization, reparam, structural  # noqa: E402,F401

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
