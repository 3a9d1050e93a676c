"""Whether a Triton kernel runs on Triton's interpreter (TRITON_INTERPRET=1: on CPU, in numpy).

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a function, not when it launches
it, so the question is asked of a kernel: a module's kernels run interpreted if they were
decorated under the variable, whatever it says now. Each kernel module binds its own kernel
(``interpreted = functools.partial(decorated_for_interpreter, _kernel)``).
"""

from __future__ import annotations


def decorated_for_interpreter(kernel) -> bool:
    """Whether the ``@triton.jit`` function ``kernel`` was decorated under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)
