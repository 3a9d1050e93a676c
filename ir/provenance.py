"""Which nodes a rewrite created from which.

Wrap the code that builds replacement nodes in ``derived_from(graph, sources)``: every node created
inside records the sources' names in ``meta["lqc_derived_from"]`` and inherits the first source's
module stack, so regions and module paths still hold after the rewrite. The pass manager turns
these marks (and the replacements it sees) into per-pass provenance.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch.fx as fx

_INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


@contextmanager
def derived_from(owner, sources: Iterable[fx.Node]) -> Iterator[None]:
    """Mark nodes created in this block as derived from ``sources``.

    ``owner`` is an lqc Graph or an fx GraphModule.
    """
    gm = getattr(owner, "gm", owner)
    sources = [s for s in sources if isinstance(s, fx.Node)]
    names = tuple(dict.fromkeys(s.name for s in sources))
    template = sources[0].meta if sources else {}

    created: list[fx.Node] = []
    # Marks are applied on exit: Graph.node_copy replaces a node's meta after the create hook runs.
    gm._register_create_node_hook(created.append)
    try:
        yield
    finally:
        gm._unregister_create_node_hook(created.append)
        for node in created:
            previous = node.meta.get("lqc_derived_from", ())
            node.meta["lqc_derived_from"] = tuple(dict.fromkeys(previous + names))
            for key in _INHERITED_META:
                if key in template and key not in node.meta:
                    node.meta[key] = template[key]
