"""lqc.runtime: packed weight formats and the implementations of lqc's ops."""

from . import hadamard, qlinear  # noqa: F401  (register the implementations of lqc::hadamard and lqc::qlinear)
from .quant_formats import FORMATS, QuantizedWeight
