"""What the benchmarks share: device facts, timing over CUDA-graph replays, vLLM's FA3
import, comma-list arguments and result-file metadata.

Import rule for every file in benchmarks/: a benchmark is a script, run as
``python benchmarks/<name>.py`` from any directory (the device machine runs them from the
repository root). Python puts a script's own folder first on sys.path, so a benchmark
imports its siblings by module name (``from common import bench_ms``, ``--select
dash_select_hook:select``) and the project as the installed package (``vllm_dash...``).
There is no benchmarks/__init__.py and no sys.path edit anywhere; the tests import benchmark
modules the same way, with benchmarks/ on pytest's ``pythonpath`` (pyproject.toml).

A kernel benchmark calls ``interpret_without_gpu()`` before it imports the kernels: on a
machine without a GPU (CPU smoke runs, the CPU tests) Triton kernels only run interpreted.
Benchmarks that start vLLM engines do not: the setting would reach the engines' processes.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def interpret_without_gpu() -> None:
    """TRITON_INTERPRET=1 (unless set) when no CUDA device is visible; call it before
    Triton or the kernels are imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


# --------------------------------------------------------------------------------------
# device facts
# --------------------------------------------------------------------------------------
def gpu_name(default: Optional[str] = "cpu") -> Optional[str]:
    """The CUDA device's name, or ``default`` without one."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else default


def hbm_peak_tbs(name: str) -> Optional[float]:
    """HBM peak bandwidth (TB/s) by device name: H100 SXM 3.35, H100 PCIe 2.0, H200 4.8."""
    n = name.upper()
    if "H200" in n:
        return 4.8
    if "H100" in n:
        return 2.0 if "PCIE" in n else 3.35
    return None


def fa3_module():
    """vLLM's flash_attn_varlen_func, or the reason it is unavailable."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        try:
            from vllm.vllm_flash_attn.flash_attn_interface import FA3_AVAILABLE
            if not FA3_AVAILABLE:
                return None, "unavailable: FA3_AVAILABLE is False"
        except ImportError:
            pass
        return flash_attn_varlen_func, None
    except Exception as e:  # noqa: BLE001 - any import failure means 'unavailable'
        return None, f"unavailable: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def capture_graph(fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph (one warm-up call on a side stream first, as
    capture requires), replayed once; raises if ``fn`` cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def bench_ms(fn: Callable[[], None], warmup: int, rep: int) -> float:
    """Median latency in ms. On CUDA: triton.testing.do_bench (L2 flushed before every run)
    of a CUDA-graph replay of ``fn`` (what vLLM's decode runs; no Python launch overhead in
    the number), or of ``fn`` itself with ``bench_ms.use_graph = False`` or when capture
    fails. On CPU: a few perf_counter runs (smoke only). The mode used is left in
    ``bench_ms.last_mode``."""
    if torch.cuda.is_available():
        import triton.testing
        fn()                                              # compile / autotune outside capture
        torch.cuda.synchronize()
        target, bench_ms.last_mode = fn, "eager"
        if bench_ms.use_graph:
            try:
                target, bench_ms.last_mode = capture_graph(fn).replay, "cuda-graph"
            except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly
                torch.cuda.synchronize()
                bench_ms.last_mode = f"eager (capture failed: {type(e).__name__})"
        return float(triton.testing.do_bench(target, warmup=warmup, rep=rep,
                                             return_mode="median"))
    bench_ms.last_mode = "cpu"
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


bench_ms.use_graph = True
bench_ms.last_mode = None


# --------------------------------------------------------------------------------------
# arguments and result files
# --------------------------------------------------------------------------------------
def ints(s: str) -> list:
    """argparse type: "4096,32768" -> [4096, 32768]."""
    return [int(x) for x in s.split(",") if x]


def floats(s: str) -> list:
    """argparse type: "0.5,0.25" -> [0.5, 0.25]."""
    return [float(x) for x in s.split(",") if x]


def versions() -> dict:
    """The software a result was measured with: torch, triton, python, vLLM and vllm-dash
    (None where not importable) and the git commit of this tree (``$VLLM_DASH_COMMIT`` where
    the tree travels without its .git, as on the device machine)."""
    import triton
    return dict(torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), vllm=_version_of("vllm"),
                vllm_dash=_version_of("vllm_dash"), commit=git_commit())


def _version_of(module: str) -> Optional[str]:
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - not installed / not importable here
        return None


def git_commit() -> Optional[str]:
    """The commit of the benchmarked tree: $VLLM_DASH_COMMIT, else ``git rev-parse``."""
    if os.environ.get("VLLM_DASH_COMMIT"):
        return os.environ["VLLM_DASH_COMMIT"]
    import subprocess
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def write_json(path: str, data: dict) -> None:
    """``data`` as indented JSON at ``path`` (its folder created when missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
