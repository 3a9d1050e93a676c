"""lqc.runtime: packed weight formats and the implementations of lqc's ops."""

from . import hadamard, moe, qlinear  # noqa: F401  (register the implementations of lqc::hadamard, lqc::moe_ffn, lqc::qlinear)
from .quant_formats import FORMATS, QuantizedWeight
