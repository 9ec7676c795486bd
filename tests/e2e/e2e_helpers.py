"""Helpers of the end-to-end tests: every vLLM engine or server runs in a child process
(vllm_dash.serving.child) inside a private network namespace (vllm_dash.serving.netns),
since vLLM 0.26 listens on all interfaces (docs/design.md §8.3).

    run_isolated(cmd, spec, env=engine_env(cache_root), timeout=VLLM_TIMEOUT_S)
    run_vllm(tmp_path, cache_root, spec)        # offline generation (generate_child.py)

Fixtures (models, the vLLM cache) are in tests/conftest.py.
"""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

from vllm_dash.serving import child, netns

HERE = pathlib.Path(__file__).resolve().parent
# A hang guard, not a speed check: on a 2-core CI machine the SmolLM2 run with a 4.6K-token
# prompt through the DASH CPU path took 120 s on one host and 340 s on a slower one.
VLLM_TIMEOUT_S = 900
_KILL_GRACE_S = 5.0

needs_netns = pytest.mark.skipif(
    not netns.available(),
    reason=f"cannot create a private network namespace: {netns.skip_reason()}. vLLM 0.26 "
           "listens on all interfaces, so its tests only run inside `unshare -n`; CI runs as "
           "root, where this must work - a skip there is a CI setup error.")


def engine_env(cache_root, **extra) -> dict:
    """Environment of an engine child on 2 CPU cores (None removes a variable)."""
    return {
        # With enforce_eager the only torch.compile left is the sampler's random-sampling
        # helper, hit by the start-up dummy sampler run (greedy decoding never calls it);
        # compiling it costs ~15 s per process (inductor's C++ ISA probes). Run it eagerly.
        "TORCH_COMPILE_DISABLE": "1",
        # Two OpenMP threads spin-waiting on a 2-core machine beside vLLM's own Python
        # threads made runs take 15-60 s at random; one thread is steady (and enough).
        "OMP_NUM_THREADS": "1",
        "VLLM_CACHE_ROOT": str(cache_root),
        "TRITON_INTERPRET": None,  # set by tests/cpu's conftest for the kernel tests
        **extra,
    }


def run_isolated(cmd, spec=None, *, env=None, timeout: float, cwd=None) -> child.ChildRun:
    """child.run in a private network namespace: os.environ updated with ``env``, and
    VLLM_CPU_KVCACHE_SPACE 1 (GiB) unless given (it also skips vLLM's check of free memory
    against gpu_memory_utilization on CPU)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           **(env or {})}
    return child.run(cmd, spec, env=env, timeout=timeout, cwd=cwd, wrap=netns.wrap,
                     grace=_KILL_GRACE_S)


def failure(res: child.ChildRun, what: str, extra: str = "") -> str:
    """An assertion message: what failed, why, and the ends of the child's output."""
    return (f"{what} failed ({res.error}, {res.seconds:.0f} s)\n"
            f"--- stdout (tail) ---\n{res.stdout[-4000:]}\n"
            f"--- stderr (tail) ---\n{res.stderr[-8000:]}{extra}")


def run_vllm(tmp_path, cache_root, spec: dict, *, check: bool = True):
    """Offline generation (generate_child.py) on ``spec``, in process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~20 s less start-up); returns its result row
    (check=False: the ChildRun, whatever its exit status)."""
    res = run_isolated([sys.executable, str(HERE / "generate_child.py")], spec,
                       env=engine_env(cache_root, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
                       timeout=VLLM_TIMEOUT_S, cwd=tmp_path)
    if not check:
        return res
    assert res.ok and res.rows, failure(res, "vLLM run")
    result = res.rows[-1]
    print(f"vLLM {spec['model']}: wall {res.seconds:.1f} s, " +
          ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()))
    return result
