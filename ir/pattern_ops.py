"""Pattern-only ops: what a pattern says that example code cannot (see ir.pattern).

Called on a traced value inside a pattern function, each records itself as one node of the
pattern graph; the matcher (ir.pattern) gives it its meaning.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx


class _PatternOp:
    """A pattern-only op: called on a traced value inside a pattern function, it records itself."""

    __name__: str

    def __call__(self, x):
        if not isinstance(x, fx.Proxy):
            raise TypeError(f"{self.__name__} is a pattern op: call it inside a pattern function")
        return x.tracer.create_proxy("call_function", self, (x,), {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__})"


class OneOf(_PatternOp):
    """Any op named in ``ops`` (ir.ops.op_name) applied to one tensor, its first argument. Only
    that argument is matched: literal options (gelu's ``approximate=``) are not compared."""

    def __init__(self, ops, name: str):
        self.ops, self.__name__ = frozenset(ops), name


class ZeroOrMore(_PatternOp):
    """A chain of zero or more graph nodes, each satisfying ``predicate`` and reading one node."""

    def __init__(self, predicate: Callable[[fx.Node], bool], name: str):
        self.predicate, self.__name__ = predicate, name
