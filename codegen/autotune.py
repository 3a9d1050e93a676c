"""Autotuning the generated qlinear kernels' launch configs, with the results cached on disk.

A generated kernel (lqc.codegen.qlinear_kernels) takes its tile sizes, split-K and warps at launch.
With ``autotune`` on, the first call at a shape runs every config of a small space on the call's
own inputs, times each, and keeps the fastest; every later call at that shape, in this process
or any other, reads the choice back instead. A shape is the kernel (its cache key), the format
and group size, M rounded up to a power of two (so decode steps of one token and prefills of 100
share little, and prefills of 100 and 120 share a choice), N, K, the dtypes, whether there is a
norm prologue, the device's name, and for float32 x whether TF32 is allowed
(``dot_input_precision``).

The space (``candidates``): BLOCK_N in 32 / 64 / 128, BLOCK_K the largest valid and half of it,
split-K off and ``pick_split_k``'s choice (small M only), at most 12 configs. BLOCK_M follows M.
On a GPU each config is timed with ``triton.testing.do_bench``; under the interpreter with a
wall clock (interpreter speed says nothing about a GPU's: autotuning is off there unless asked).

Results live in ``<kernel cache>/autotune.json`` (lqc.codegen.kernel_cache.cache_dir), beside the
kernel sources they were measured for. ``stats`` counts shapes tuned, read from disk and reused.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import kernel_cache
from .templates import dot_input_precision

BLOCK_NS = (32, 64, 128)


@dataclass
class TuneStats:
    tuned: int = 0  # shapes measured (cold)
    loaded: int = 0  # choices read from the file
    reused: int = 0  # choices already in memory


stats = TuneStats()
_choices: dict[str, dict] = {}
_lock = threading.Lock()


def cache_file():
    return kernel_cache.cache_dir() / "autotune.json"


def forget_tuned() -> None:
    """Drop the choices held in memory (the file stays): the next call reads them back from disk."""
    with _lock:
        _choices.clear()


def candidates(fmt: str, group_size: int, m: int, n: int, k: int, on_gpu: bool) -> list[dict]:
    """The launch configs tried for one shape."""
    import triton

    from .dequant_gemm import SPLIT_K_MAX_M, default_block_k, pick_split_k

    block_m = min(64, max(16, triton.next_power_of_2(m)))
    largest_k = default_block_k(fmt, group_size)
    block_ks = [largest_k] + ([largest_k // 2] if largest_k // 2 >= 16 else [])
    configs = []
    for block_n in BLOCK_NS:
        for block_k in block_ks:
            splits = {1}
            if m <= SPLIT_K_MAX_M:
                sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count if on_gpu else 132
                splits.add(pick_split_k(m, n, k, block_m, block_n, block_k, sms))
            for split_k in sorted(splits):
                configs.append(dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                                    num_warps=8 if on_gpu and block_n == 128 else 4, num_stages=3))
    return configs


def shape_key(kernel: str, x: torch.Tensor, fmt: str, group_size: int, n: int, k: int, has_norm: bool,
              out_dtype: torch.dtype) -> str:
    import triton

    m = math.prod(x.shape[:-1])
    device = torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu-interpreter"
    # float32 x with TF32 allowed runs another dot (dot_input_precision): timed apart
    tf32 = "|tf32" if x.dtype == torch.float32 and dot_input_precision() == "tf32" else ""
    return (f"{kernel}|{fmt}|g{group_size}|m{triton.next_power_of_2(max(m, 1))}|n{n}|k{k}|{x.dtype}->{out_dtype}"
            f"|{'norm' if has_norm else 'plain'}|{device}{tf32}")


def measure(run: Callable[[], object], on_gpu: bool) -> float:
    """Seconds one run of ``run`` takes (the best of a few)."""
    if on_gpu:
        import triton.testing

        return triton.testing.do_bench(run, warmup=5, rep=20) / 1e3
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def tuned_config(kernel, x, fmt, group_size, in_features, out_features, prologue: bool, out_dtype,
                 run: Callable[[dict], object]) -> dict:
    """The fastest config for this call's shape: from memory, else from the file, else measured
    now by calling ``run(config)`` (the kernel's launch with that config) for each candidate."""
    key = shape_key(kernel, x, fmt, group_size, out_features, in_features, prologue, out_dtype)
    with _lock:
        if key in _choices:
            stats.reused += 1
            return _choices[key]
        stored = _read().get(key)
        if stored is not None:
            stats.loaded += 1
            _choices[key] = stored
            return stored
    on_gpu = x.is_cuda
    timings = [(measure(lambda config=config: run(config), on_gpu), config)
               for config in candidates(fmt, group_size, math.prod(x.shape[:-1]), out_features, in_features, on_gpu)]
    seconds, best = min(timings, key=lambda pair: pair[0])
    with _lock:
        stats.tuned += 1
        _choices[key] = best
        _write(key, best, seconds)
    return best


def _read() -> dict:
    path = cache_file()
    try:
        return {key: entry["config"] for key, entry in json.loads(path.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no file yet, or one this version cannot read: tune again


def _write(key: str, config: dict, seconds: float) -> None:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    entries[key] = {"config": config, "seconds": seconds}
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
    temporary.replace(path)  # atomic, as the kernel sources
