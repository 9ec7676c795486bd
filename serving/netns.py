"""Run a command in a private network namespace: only a loopback interface, brought up.

vLLM 0.26 opens a torch TCPStore listening on all interfaces, whatever host it is given
(docs/design.md §8.3), so every engine or server this project starts for a test or a check
runs inside ``unshare -n``, where nothing but the namespace's own ``lo`` exists. Two ways in:

* from Python, composed with the child runner (``vllm_dash.serving.child.run``)::

      run(cmd, spec, timeout=600, wrap=netns.wrap)

  ``wrap(cmd, env)`` returns ``unshare -n python netns.py CMD...`` and the environment with
  ISOLATION_ENV;
* from a shell (tools/device_run.sh)::

      unshare -n python3 serving/netns.py CMD...

Run as a script (which is what ``wrap`` does), this file brings ``lo`` up with the two ioctls
that ``ip link set lo up`` performs (so iproute2 is not needed: the GPU machine has none),
sets ISOLATION_ENV, and then becomes CMD (exec). It imports nothing but the standard library,
so it runs by path under ``python -I -S`` (no site-packages, no working directory on the
path: a repository checkout's ``vllm_dash/`` cannot shadow the installed package).

Creating the namespace needs root (CI runs as root); ``skip_reason()`` says why it cannot
be created elsewhere.
"""
from __future__ import annotations

import fcntl
import functools
import os
import shutil
import socket
import struct
import subprocess
import sys
from typing import Mapping, Optional, Sequence

__all__ = ["ISOLATION_ENV", "wrap", "skip_reason", "available", "lo_up"]

# Always set inside the namespace: bind vLLM/gloo to the namespace's loopback, never touch
# the network (models are local folders), and no usage reporting.
ISOLATION_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH14x"          # struct ifreq: interface name, then the flags (short)


def lo_up() -> None:
    """Bring the loopback interface up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP);
    raises OSError without the right to (outside a namespace of one's own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))


def wrap(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None) -> tuple[list, dict]:
    """(argv, env) that run ``cmd`` in a new network namespace with ``lo`` up; ``env``
    (default os.environ) updated with ISOLATION_ENV."""
    argv = ["unshare", "-n", sys.executable, "-I", "-S", os.path.abspath(__file__),
            *map(str, cmd)]
    return argv, {**(os.environ if env is None else env), **ISOLATION_ENV}


@functools.lru_cache(maxsize=1)
def skip_reason() -> Optional[str]:
    """None if a private network namespace can be created here, else why not."""
    if shutil.which("unshare") is None:
        return "`unshare` is not installed"
    argv, env = wrap(["true"])
    try:
        probe = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                               start_new_session=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare -n` failed: {exc!r}"
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).strip() or f"exit status {probe.returncode}"
        return f"`unshare -n` failed (needs root or unprivileged user namespaces): {detail}"
    return None


def available() -> bool:
    """True if ``unshare -n`` works here (it must on CI, which runs as root)."""
    return skip_reason() is None


def main(argv: Sequence[str]) -> None:
    """Inside the new namespace: lo up, ISOLATION_ENV, then exec ``argv``."""
    if not argv:
        sys.exit("usage: unshare -n python netns.py CMD [ARG...]")
    lo_up()
    os.environ.update(ISOLATION_ENV)
    os.execvp(argv[0], list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
