"""The Pass base class and what a pass returns.

A pass has a registered name, a typed options dataclass, and ``run(graph, ctx) -> PassResult``.
It declares what it ``requires`` ("calibration": the manager refuses to run it without
calibration data, naming the fix; a pass whose needs depend on its options overrides
``requirements()``, the class attribute stays as declared) and which analyses it ``preserves``
("regions": after the pass, the graph's regions (``graph.regions``, each ``Region.nodes``, every
node's ``lqc_region``) equal what a fresh ``ir.annotate_regions`` would compute, so the manager
skips re-annotating; tests/test_pass_contracts.py holds every pass that declares it to that).
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch.fx as fx

from lqc.ir import Graph
from lqc.ir.errors import LqcConfigError

from lqc.passes.options import PassOptions, parse_options

if TYPE_CHECKING:  # context.py imports this module
    from lqc.passes.context import PassContext


@dataclass
class PassResult:
    """What a pass reports. ``matches`` counts rewrite sites; ``details`` is the pass's own typed
    report (a dataclass with the per-layer tables and choices it made, or None), which readers
    use by attribute; it lands in the pass record and, as JSON, in the debug dump."""

    matches: int = 0
    details: Any = None
    message: str = ""


class Pass(abc.ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    requires: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]] = frozenset()
    stage: ClassVar[str] = "recipe"  # "lowering": picked by the target after the recipe, not a recipe entry

    def __init__(self, options: PassOptions | None = None, **values: Any):
        if options is not None and values:
            raise TypeError("pass either an options object or keyword options, not both")
        self.options = options if options is not None else parse_options(self.Options, values, pass_name=self.name)
        self._targets = [self._compile(p, "targets") for p in self.options.targets]
        self._ignore = [self._compile(p, "ignore") for p in self.options.ignore]
        self.selected_paths: set[str] = set()  # every module path selects() was asked about, in one run

    def _compile(self, pattern: str, option: str) -> re.Pattern:
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise LqcConfigError(
                f"pass {self.name!r}: {option} entry '{pattern}' is not a valid regular expression ({exc}). "
                f"Patterns are Python regexes searched in module paths (re.search): fix the pattern, or escape "
                f"characters meant literally, such as ( [ * + ?, with a backslash"
            ) from None

    def requirements(self) -> frozenset[str]:
        """What this instance needs from the manager: ``requires``, unless the options change it."""
        return self.requires

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    @abc.abstractmethod
    def run(self, graph: Graph, ctx: "PassContext") -> PassResult:
        """Rewrite ``graph`` in place."""

    def selects(self, where: fx.Node | str) -> bool:
        """Whether ``targets``/``ignore`` let this pass touch a node (by its module path) or a path."""
        path = Graph.module_path(where) if isinstance(where, fx.Node) else where
        self.selected_paths.add(path)  # the manager checks every pattern matched one of these
        if self._targets and not any(p.search(path) for p in self._targets):
            return False
        return not any(p.search(path) for p in self._ignore)

    def unmatched_patterns(self) -> list[tuple[str, str]]:
        """(option, pattern) of every ``targets``/``ignore`` pattern that matched none of the module
        paths this run asked ``selects`` about: a pattern that selects nothing is a typo, not a choice.
        Each pattern is tried on every path (not only on those ``targets`` let through), so an
        ``ignore`` inside the targets' modules counts as matching."""
        return [
            (option, p.pattern)
            for option, patterns in (("targets", self._targets), ("ignore", self._ignore))
            for p in patterns
            if not any(p.search(path) for path in self.selected_paths)
        ]
