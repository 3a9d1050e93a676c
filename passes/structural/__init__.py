"""Structural compression: dropping layers (and scoring them), FFNs carved into experts."""

from lqc.passes.structural import drop_layers, ffn_to_moe, route_neurons  # noqa: F401  (register the passes)
