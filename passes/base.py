"""The Pass base class and what a pass returns.

A pass has a registered name, a typed options dataclass, and ``run(graph, ctx) -> PassResult``.
It declares what it ``requires`` ("calibration": the manager refuses to run it without
calibration data, naming the fix) and which analyses it ``preserves`` ("regions": the manager
need not re-annotate regions after it).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch.fx as fx

from lqc.ir import Graph

from lqc.passes.options import PassOptions, parse_options

if TYPE_CHECKING:  # context.py imports this module
    from lqc.passes.context import PassContext


@dataclass
class PassResult:
    """What a pass reports. ``matches`` counts rewrite sites; ``details`` is free-form (per-layer
    tables, choices made) and lands in the debug dump and the pass record."""

    changed: bool = True
    matches: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    message: str = ""


class Pass(abc.ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: PassOptions | None = None, **values: Any):
        if options is not None and values:
            raise TypeError("pass either an options object or keyword options, not both")
        self.options = options if options is not None else parse_options(self.Options, values, pass_name=self.name)
        self._targets = [re.compile(p) for p in self.options.targets]
        self._ignore = [re.compile(p) for p in self.options.ignore]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    @abc.abstractmethod
    def run(self, graph: Graph, ctx: "PassContext") -> PassResult:
        """Rewrite ``graph`` in place."""

    def selects(self, where: fx.Node | str) -> bool:
        """Whether ``targets``/``ignore`` let this pass touch a node (by its module path) or a path."""
        path = Graph.module_path(where) if isinstance(where, fx.Node) else where
        if self._targets and not any(p.search(path) for p in self._targets):
            return False
        return not any(p.search(path) for p in self._ignore)
