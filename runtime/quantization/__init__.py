"""Quantized weights: packed formats, lqc::qlinear's implementation, the online Hadamard rotation."""
