"""Run work (a vLLM engine, a server scenario) in a child Python process and read its rows.

Why a child process: an engine gives its memory back (GPU memory, the CPU KV cache) only when
its process exits; a crashed or hung engine must not take the caller with it; and vLLM reads
its environment (VLLM_ENABLE_V1_MULTIPROCESSING, ...) at import.

Protocol, one for every user (the accuracy harness, the benchmarks, the tests; see
docs/design.md §7.2): the child prints each result as ONE line, ``ROW_PREFIX`` + one JSON
object (``emit``); every other line of its stdout/stderr is log. The parent keeps every row
that arrived, in order, so a child that crashes, runs out of time or is stopped still gives
back what it had finished.

Parent::

    res = run([sys.executable, "-m", "some.module"], spec, timeout=600)
    res.rows, res.error        # rows that arrived; None, "timeout after 600 s" or "exit 1"

The spec (a JSON-able dict: what to run, engine arguments) is written to a temporary file
whose path is the child's last argument. Child (``some.module``)::

    if __name__ == "__main__":           # vLLM may re-import the module in its processes
        child.main(work)                 # work(spec) emits rows; a returned dict is one more

The child runs in a session of its own; on a timeout, or when the parent is interrupted
(Ctrl-C), that process group - and only it - gets SIGTERM, then SIGKILL after ``grace``
seconds, so no engine outlives the call. ``wrap`` composes another launcher around the
command, e.g. ``vllm_dash.serving.netns.wrap`` (a private network namespace).

No vLLM import here: the parent stays light, and the child imports what it needs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["ROW_PREFIX", "ChildRun", "emit", "main", "run", "read_spec"]

ROW_PREFIX = "VLLM_DASH_ROW "

Wrapper = Callable[[Sequence[str], Mapping[str, str]], "tuple[list, dict]"]


# --------------------------------------------------------------------------------------
# child side
# --------------------------------------------------------------------------------------
def emit(row: dict) -> None:
    """Send one row to the parent (flushed at once: a row printed is a row kept)."""
    print(ROW_PREFIX + json.dumps(row), flush=True)


def read_spec(argv: Optional[Sequence[str]] = None) -> dict:
    """The spec the parent wrote: the JSON file named by the last argument."""
    argv = sys.argv if argv is None else argv
    with open(argv[-1]) as f:
        return json.load(f)


def main(work: Callable[[dict], Optional[dict]], argv: Optional[Sequence[str]] = None) -> None:
    """Child entry point: ``work(spec)``; a dict it returns is emitted as the last row."""
    row = work(read_spec(argv))
    if row is not None:
        emit(row)


# --------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class ChildRun:
    """What a child gave back. ``error`` is None when it exited with status 0, else
    ``"timeout after N s"`` or ``"exit N"`` (negative N: killed by signal -N); ``rows`` holds
    every row that arrived either way."""
    rows: list
    error: Optional[str]
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def log_tail(self, n: int = 4000) -> str:
        """The end of the child's stderr (its stdout when stderr is empty)."""
        return (self.stderr or self.stdout)[-n:]


def parse_rows(stdout: str) -> list:
    """The rows of a child's stdout; a line cut short by a kill (bad JSON) is skipped."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            try:
                rows.append(json.loads(line[len(ROW_PREFIX):]))
            except ValueError:
                pass
    return rows


def child_env(env: Optional[Mapping[str, Optional[str]]] = None) -> dict:
    """os.environ updated with ``env``; a value of None removes the variable."""
    out = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = str(value)
    return out


def run(cmd: Sequence[str], spec: Optional[dict] = None, *, timeout: float,
        env: Optional[Mapping[str, Optional[str]]] = None, cwd=None,
        wrap: Optional[Wrapper] = None, grace: float = 30.0) -> ChildRun:
    """Run ``cmd`` (+ the spec file's path, when a spec is given) to completion or
    ``timeout`` seconds; see the module docstring. KeyboardInterrupt (and any other
    exception) stops the child's process group and is re-raised."""
    argv, full_env = [str(c) for c in cmd], child_env(env)
    path = None
    if spec is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="vllm-dash-spec-",
                                         delete=False) as f:
            json.dump(spec, f)
            path = f.name
        argv.append(path)
    if wrap is not None:
        argv, full_env = wrap(argv, full_env)
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", env=full_env, cwd=cwd,
                                start_new_session=True)      # process group id == proc.pid
        error = None
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stdout, stderr = stop_group(proc, grace)
            error = f"timeout after {timeout:.0f} s"
        except BaseException:                # Ctrl-C, ...: never leave the engine running
            stop_group(proc, grace)
            raise
    finally:
        if path is not None:
            os.unlink(path)
    if error is None and proc.returncode != 0:
        error = f"exit {proc.returncode}"
    return ChildRun(parse_rows(stdout), error, proc.returncode, stdout, stderr,
                    time.monotonic() - t0)


def stop_group(proc: subprocess.Popen, grace: float) -> tuple:
    """SIGTERM, then (after ``grace`` seconds) SIGKILL, the process group led by ``proc``
    (not yet reaped, so its pid still names the group); returns the output so far."""
    _signal_group(proc, signal.SIGTERM)
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        return proc.communicate()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:               # the group has already gone
        pass
