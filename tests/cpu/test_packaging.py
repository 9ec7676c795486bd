"""Packaging facts that no other test would notice: the Docker image's wheel stage copies
every source folder that pyproject.toml installs, and the build context lets them in."""
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_docker_build_copies_every_installed_package():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in cfg["tool"]["setuptools"]["package-dir"].values()}
    assert {"vllm_dash", "kernels", "serving", "eval"} <= folders
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    for folder in sorted(folders):
        assert re.search(rf"^COPY {folder} \./{folder}$", dockerfile, re.M), folder
        assert f"!{folder}/" in ignore, folder
