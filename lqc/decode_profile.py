"""Where one decode step's time goes: ``lqc bench --profile``.

The model is compiled with lqc (Inductor's CPU kernels carry their names into the profile:
``cpp.enable_kernel_profile``), a prompt fills a static cache, and ``steps`` decode steps run
under ``torch.profiler``. Every recorded op's own time (self CPU time: its children excluded, so
nothing counts twice) is filed under

- where it ran: the piece of the graph (``codegen.shared_blocks``: before the blocks, the blocks,
  after them: the final norm and the lm_head) or, for a graph compiled whole, the graph;
- what it is: linear (lqc::qlinear and the GEMM under it, mm/addmm), attention (SDPA, softmax,
  bmm), Inductor's fused kernels (norms, rotary, residual adds, casts, cache writes), other ATen
  ops (casts and copies an op does itself, allocation), and wrappers (the bookkeeping of dynamo,
  AOTAutograd and Inductor's Python around the kernels).

What no recorded op covers is Python: transformers' glue between calls, lqc's runtime guard,
the decode loop. Times are per step, measured under the profiler (which adds a little to every
op); the step time without it is printed beside.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

KINDS = [
    ("linear", re.compile(r"qlinear|int8pack|int4pack|aten::(mm|addmm|linear|matmul)$")),
    ("attention", re.compile(r"scaled_dot_product|flash_attention|softmax|aten::bmm$|aten::baddbmm$|kv_.*attention")),
    ("Inductor kernels", re.compile(r"cpp_fused|cpp_kernel")),
    ("wrappers", re.compile(r"^## |^lqc piece |Torch-Compiled Region|TorchDynamo|AOTDispatcher|Pregraph bytecode")),
]
PIECE = re.compile(r"^lqc piece (.*)$")


@dataclass
class DecodeProfile:
    recipe: str
    steps: int
    step_ms: float  # median step time without the profiler
    profiled_step_ms: float  # mean step time under it
    rows: dict[tuple[str, str], float] = field(default_factory=dict)  # (where, kind) -> ms per step
    top_ops: list[tuple[str, float, int]] = field(default_factory=list)  # (name, ms per step, calls per step)
    ops_per_step: int = 0  # events the profiler recorded a step

    @property
    def profiler_us_per_op(self) -> float:
        """What recording costs, spread over the ops: rows of many small ops are inflated most."""
        return max(self.profiled_step_ms - self.step_ms, 0.0) * 1e3 / max(self.ops_per_step, 1)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "steps": self.steps, "step_ms": self.step_ms,
                "profiled_step_ms": self.profiled_step_ms, "ops_per_step": self.ops_per_step,
                "profiler_us_per_op": self.profiler_us_per_op,
                "rows": [{"where": w, "kind": k, "ms_per_step": ms} for (w, k), ms in self.rows.items()],
                "top_ops": [{"name": n, "ms_per_step": ms, "calls_per_step": c} for n, ms, c in self.top_ops]}


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other ATen ops"


def where_of(event) -> str:
    """The lqc piece an event ran in ("blocks" for any block), else "graph" inside a compiled
    graph, else "outside the graph"."""
    inside_graph = False
    while event is not None:
        match = PIECE.match(event.name)
        if match:
            return "blocks" if match.group(1).startswith("block") else match.group(1)
        inside_graph = inside_graph or event.name.startswith("## Call CompiledFxGraph")
        event = event.cpu_parent
    return "graph" if inside_graph else "outside the graph"


def summarize(events, steps: int, profiled_seconds: float) -> tuple[dict[tuple[str, str], float], list]:
    rows: dict[tuple[str, str], float] = defaultdict(float)
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    covered_us = 0.0
    for event in events:
        self_us = event.self_cpu_time_total
        covered_us += self_us
        rows[(where_of(event), kind_of(event.name))] += self_us / 1e3 / steps
        per_op[event.name][0] += self_us
        per_op[event.name][1] += 1
    rows[("outside the graph", "Python (no op recorded)")] = max(profiled_seconds * 1e6 - covered_us, 0.0) / 1e3 / steps
    top = sorted(((name, us / 1e3 / steps, count // steps) for name, (us, count) in per_op.items()), key=lambda r: -r[1])
    return dict(rows), top[:12]


def profile_decode(model: torch.nn.Module, forward_for: Callable[[], Callable], *, recipe: str, prompt_tokens: int = 128,
                   steps: int = 32, seed: int = 0, log: Callable[[str], None] = print) -> DecodeProfile:
    """``forward_for()`` compiles the forward to profile (called with Inductor's kernel names on)."""
    import torch._inductor.config as inductor_config
    from lqc.bench import static_cache

    from lqc.ir.errors import LqcConfigError

    if steps < 1 or prompt_tokens < 1:
        raise LqcConfigError(f"a decode profile needs at least one prompt token and one step; got prompt_tokens="
                             f"{prompt_tokens}, steps={steps} (--prompt-tokens, --profile-steps)")

    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    length = prompt_tokens + 3 * steps + 2
    cache = static_cache(model.config, length)
    position = [prompt_tokens]

    def step(token: torch.Tensor) -> torch.Tensor:
        out = forward(input_ids=token, cache=cache, use_cache=True, position_ids=torch.tensor([position]))
        position[0] += 1
        return out.logits[:, -1:].argmax(-1)

    log(f"profile: compiling {recipe} (Inductor's kernels named) and decoding {steps} tokens after {prompt_tokens} ...")
    with inductor_config.patch({"cpp.enable_kernel_profile": True}), torch.no_grad():
        forward = forward_for()
        token = forward(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        token = step(token)  # compiles the decode graph
        plain = []
        for _ in range(steps):
            start = time.perf_counter()
            token = step(token)
            plain.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                token = step(token)
            profiled = time.perf_counter() - start
    events = prof.events()
    rows, top = summarize(events, steps, profiled)
    return DecodeProfile(recipe, steps, statistics.median(plain) * 1e3, profiled / steps * 1e3, rows, top,
                         len(events) // steps)


def format_profile(p: DecodeProfile) -> str:
    lines = [f"one decode step of lqc {p.recipe}: {p.step_ms:.2f} ms ({p.profiled_step_ms:.2f} ms under the profiler, "
             f"mean of {p.steps} steps)",
             f"{p.ops_per_step} ops recorded a step: recording costs ~{p.profiler_us_per_op:.1f} us an op, inside every "
             f"row, so rows of many small ops read high (check a change by timing it, not by its row)", "",
             f"{'where':<20} {'what':<26} {'ms/step':>8} {'share':>6}", f"{'-' * 20} {'-' * 26} {'-' * 8} {'-' * 6}"]
    for (where, kind), ms in sorted(p.rows.items(), key=lambda r: -r[1]):
        if ms >= 0.005:
            lines.append(f"{where:<20} {kind:<26} {ms:>8.2f} {ms / p.profiled_step_ms:>6.1%}")
    lines += ["", "busiest ops (own time):", f"{'op':<60} {'ms/step':>8} {'calls/step':>10}"]
    lines += [f"{name[:60]:<60} {ms:>8.2f} {calls:>10}" for name, ms, calls in p.top_ops]
    return "\n".join(lines) + "\n"
