"""lqc.runtime: packed weight formats and the implementations of lqc's ops."""

from . import qlinear  # noqa: F401  (registers the lqc::qlinear implementation)
from .quant_formats import FORMATS, QuantizedWeight
