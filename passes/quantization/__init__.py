"""Quantization: the quantize pass and its methods (GPTQ, AWQ, HQQ, SmoothQuant), activation
statistics and per-layer sensitivity."""

from lqc.passes.quantization import quantize  # noqa: F401  (registers the pass)
