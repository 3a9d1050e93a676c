"""The errors lqc raises. Every layer derives from these, so callers can tell two kinds apart:

- :class:`LqcConfigError`: the user asked for something wrong (unknown pass, bad option, missing
  calibration data). The backend re-raises these: a fallback would hide the mistake.
- :class:`LqcGraphError`: lqc cannot handle this graph (unsupported op, failed verification).
  The backend falls back to Inductor with a warning.
"""


class LqcError(Exception):
    """Base of all lqc errors."""


class LqcConfigError(LqcError, ValueError):
    """Bad user input: the message names the fix."""


class LqcGraphError(LqcError):
    """lqc cannot compile this graph; the backend falls back to Inductor."""


class CaptureError(LqcGraphError):
    """The dynamo graph could not be turned into an lqc Graph."""


class ShapePropagationError(LqcGraphError):
    """FakeTensor propagation failed at a node."""


class VerificationError(LqcGraphError):
    """A graph failed verification after a pass."""
