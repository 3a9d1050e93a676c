"""lqc.ir: capture, the frozen Graph, regions, shapes, op names, patterns. Imports nothing of lqc."""

from . import lqc_ops  # noqa: F401  (defines the lqc:: ops)
from .capture import capture, trace
from .errors import (
    CaptureError,
    LqcConfigError,
    LqcError,
    LqcGraphError,
    ShapePropagationError,
    VerificationError,
)
from .graph import FrozenInput, Graph, GraphInput
from .ops import COMMUTATIVE_OPS, op_name
from .regions import REGION_KINDS, Region, annotate_regions
from .shapes import describe_value, propagate_shapes

__all__ = [
    "COMMUTATIVE_OPS",
    "CaptureError",
    "FrozenInput",
    "Graph",
    "GraphInput",
    "LqcConfigError",
    "LqcError",
    "LqcGraphError",
    "REGION_KINDS",
    "Region",
    "ShapePropagationError",
    "VerificationError",
    "annotate_regions",
    "capture",
    "describe_value",
    "op_name",
    "propagate_shapes",
    "trace",
]
