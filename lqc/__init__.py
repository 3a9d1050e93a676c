"""lqc: a compression compiler for PyTorch transformer models.

``torch.compile(model, backend="lqc", options={"recipe": ...})`` works without importing lqc
(entry point ``torch_dynamo_backends``). This package adds the ahead-of-time ``compress``, model
loading, the per-layer search ``lqc.auto``, export to serving engines' formats, evaluation and benchmarking, and re-exports the pass-development API.
"""

from lqc.version import __version__  # noqa: E402, F401
from lqc import auto, models  # noqa: E402
from lqc.backend import lqc_backend, session_of  # noqa: E402
from lqc.compress import compress  # noqa: E402
from lqc.exporters import export  # noqa: E402
from lqc.generate import generate  # noqa: E402
from lqc.ir import Graph, LqcConfigError, LqcError, LqcGraphError  # noqa: E402
from lqc.options import CompileOptions  # noqa: E402
from lqc.pipeline import Compilation, Session  # noqa: E402
from lqc.passes import Pass, PassContext, PassManager, PassResult, register_pass  # noqa: E402
from lqc.serialize import CheckpointError, load, save  # noqa: E402

__all__ = [
    "CheckpointError",
    "Compilation",
    "CompileOptions",
    "Graph",
    "LqcConfigError",
    "LqcError",
    "LqcGraphError",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "compress",
    "export",
    "generate",
    "load",
    "lqc_backend",
    "models",
    "register_pass",
    "save",
    "Session",
    "auto",
    "session_of",
]
