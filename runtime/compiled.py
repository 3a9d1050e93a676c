"""The callable lqc hands back to dynamo for one graph.

Dynamo calls it with every argument of its graph: user inputs and the parameters it lifted.
The compiled function only takes the user inputs (the parameters are frozen inside), so this
picks them out. It also checks that every frozen parameter is still the same tensor at the same
version: dynamo passes parameters "unguarded" and will not recompile when one changes in place,
so without this check a model updated after compilation would silently run its old weights.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class CompiledGraph:
    def __init__(self, fn: Callable, user_indices: Sequence[int], frozen: Sequence[tuple[int, torch.Tensor, int]],
                 name: str = "graph"):
        self.fn = fn
        self.user_indices = tuple(user_indices)
        self.frozen = tuple(frozen)  # (argument index, tensor, its _version at compile time)
        self.name = name

    def weights_unchanged(self, args: Sequence[Any]) -> bool:
        for index, tensor, version in self.frozen:
            arg = args[index]
            if arg is not tensor or arg._version != version:
                return False
        return True

    def weights_changed(self, args: Sequence[Any]) -> None:
        """Called when a frozen weight is no longer the tensor (or version) it was at compile time.
        Here that is an error; the pipeline's subclass recompresses instead (lqc.pipeline)."""
        raise RuntimeError(f"lqc: the weights of {self.name} changed after compilation; recompile the model")

    def __call__(self, *args: Any) -> Any:
        if not self.weights_unchanged(args):
            self.weights_changed(args)
        return self.fn(*[args[i] for i in self.user_indices])
