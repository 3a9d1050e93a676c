"""lqc's version, in a module of its own: what writes or checks it (lqc.serialize) imports this
instead of the package, whose ``__init__`` imports everything else."""

__version__ = "0.1.0"
