"""The callable lqc hands back to dynamo for one graph.

Dynamo calls it with every argument of its graph: user inputs and the parameters it lifted.
The compiled function only takes the user inputs (the parameters are frozen inside), so this
picks them out. It also checks that every frozen parameter is still the same tensor at the same
version: dynamo passes parameters "unguarded" and will not recompile when one changes in place,
so without this check a model updated after compilation would silently run its old weights.

Token ids are checked here too, on every call: an id outside the embedding table reaches a
generated kernel as an out-of-bounds read (Inductor's C++ asserts, a GPU kernel may read garbage).
Dynamo's guards already pin each input's dtype and rank and tell an empty sequence from a full
one, so a new dtype or an empty input recompiles (and meets the first call's full check); only the
values are left, and one read per call checks them (a decode step's single id: under a
microsecond on CPU; longer inputs: one ``aminmax``, a few microseconds; a decode step takes
milliseconds). On a GPU, reading the result back synchronizes with the device once per
call: a decode loop that reads its next token on the host pays that anyway, one that stays on the
device (CUDA graphs) should turn the check off (``check_inputs=False``). ``check_token_ids`` is the
full check the entry points run once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from lqc.ir.errors import LqcConfigError


class CompiledGraph:
    def __init__(self, fn: Callable, user_indices: Sequence[int], frozen: Sequence[tuple[int, torch.Tensor, int]],
                 name: str = "graph", token_checks: Sequence[tuple[int, int]] = ()):
        self.fn = fn
        self.user_indices = tuple(user_indices)
        self.frozen = tuple(frozen)  # (argument index, tensor, its _version at compile time)
        self.name = name
        # (argument index, rows of the embedding table it indexes): checked on every call; empty
        # when the session's check_inputs option is off
        self.token_checks = tuple(token_checks)

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
        for index, rows in self.token_checks:
            check_token_range(args[index], rows, f"lqc ({self.name})")
        return self.fn(*[args[i] for i in self.user_indices])


def check_token_range(ids: torch.Tensor, rows: int, where: str) -> None:
    """Raise LqcConfigError unless every id lies in [0, rows): one reduction, one comparison."""
    count = ids.numel()
    if count == 1:  # a decode step's one token: one read, several times cheaper than a reduction
        low = high = ids.item()
    elif count:
        low, high = (int(v) for v in torch.aminmax(ids))
    else:
        return  # nothing is looked up (an empty input is refused by check_token_ids on the first call)
    if low < 0 or high >= rows:
        raise LqcConfigError(
            f"{where}: token ids must lie in [0, {rows}) (the rows of the model's embedding table); got ids from "
            f"{low} to {high}. Use the model's own tokenizer (a tokenizer with a larger vocabulary gives ids the "
            f"model has no embedding for), or pass only ids below {rows}"
        )


def check_token_ids(ids: Any, rows: int | None, where: str) -> None:
    """The full check of token ids at an entry point: a non-empty integer tensor of rank 1 or more
    and, when ``rows`` (the embedding table's) is known, every id in [0, rows)."""
    if not isinstance(ids, torch.Tensor):
        raise LqcConfigError(f"{where}: token ids must be a torch.Tensor of integers; got {type(ids).__name__}. "
                             f"Pass e.g. tokenizer(text, return_tensors='pt').input_ids")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise LqcConfigError(f"{where}: token ids must be integers (torch.long); got {ids.dtype}. Token ids index the "
                             f"embedding table: pass the tokenizer's ids, or convert with ids.long() if they are "
                             f"whole numbers stored as floats")
    if ids.dim() == 0 or ids.numel() == 0:
        raise LqcConfigError(f"{where}: token ids must hold at least one token; got shape {tuple(ids.shape)}. Pass "
                             f"[batch, tokens] ids with tokens >= 1 (an empty prompt has nothing to attend to: start "
                             f"it with the tokenizer's BOS token)")
    if rows is not None and ids.device.type != "meta":
        check_token_range(ids, rows, where)
