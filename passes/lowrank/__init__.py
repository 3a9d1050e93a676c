"""Low-rank: error-compensation paths fitted on calibration inputs (EoRA) for compressed linears."""

from lqc.passes.lowrank import compensate  # noqa: F401  (registers the pass)
