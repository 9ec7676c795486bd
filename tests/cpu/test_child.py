"""The child runner (vllm_dash.serving.child) and the network-namespace wrapper
(vllm_dash.serving.netns), with small Python children instead of engines: rows arrive in
order and survive a crash or a timeout, the spec reaches the child, the whole process group
is stopped (timeout, Ctrl-C), and a wrapped child sees only a loopback interface."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from vllm_dash.serving import child, netns

# A child that emits a row per argument of its spec, starts a grandchild that sleeps in its
# process group (its pid written to spec["pid_file"]), then does what spec["then"] says.
CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    from vllm_dash.serving import child

    def work(spec):
        print("engine log line", flush=True)
        for i in spec["rows"]:
            child.emit({"i": i})
        if spec.get("pid_file"):
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open(spec["pid_file"], "w").write(str(p.pid))
        if spec["then"] == "cut":
            sys.stdout.write(child.ROW_PREFIX + '{"cut": ')      # a row cut mid-line
            sys.stdout.flush()
            time.sleep(600)
        if spec["then"] == "fail":
            sys.exit("boom")
        return {"done": True}

    if __name__ == "__main__":
        child.main(work)
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "child_script.py"
    path.write_text(CHILD)
    return [sys.executable, str(path)]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return False
        if state in "ZX":
            return False
        time.sleep(0.1)                  # SIGTERM delivered, not yet handled
    return True


def test_rows_in_order_and_the_returned_row_last(script):
    res = child.run(script, {"rows": [1, 2, 3], "then": "return"}, timeout=60)
    assert res.ok and res.returncode == 0 and res.error is None
    assert res.rows == [{"i": 1}, {"i": 2}, {"i": 3}, {"done": True}]
    assert "engine log line" in res.stdout


def test_failure_keeps_rows_and_says_why(script):
    res = child.run(script, {"rows": [1], "then": "fail"}, timeout=60)
    assert not res.ok and res.error == "exit 1" and res.returncode == 1
    assert res.rows == [{"i": 1}] and "boom" in res.log_tail()


def test_timeout_keeps_rows_and_stops_the_process_group(script, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    res = child.run(script, {"rows": [1, 2], "then": "cut", "pid_file": str(pid_file)},
                    timeout=3, grace=5)
    assert time.monotonic() - t0 < 30
    assert res.error == "timeout after 3 s" and res.rows == [{"i": 1}, {"i": 2}]
    assert not _alive(int(pid_file.read_text()))      # the grandchild went with the group


def test_interrupt_stops_the_child_and_is_raised(script, tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    real = subprocess.Popen.communicate
    calls = []

    def interrupted(self, *a, **kw):                  # Ctrl-C while waiting for the child
        calls.append(1)
        if len(calls) == 1:
            while not pid_file.exists():
                time.sleep(0.05)
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        child.run(script, {"rows": [], "then": "cut", "pid_file": str(pid_file)}, timeout=60,
                  grace=5)
    assert not _alive(int(pid_file.read_text()))


def test_env_and_no_spec():
    res = child.run([sys.executable, "-c", "import os, sys; from vllm_dash.serving import "
                     "child; child.emit({'argv': sys.argv[1:], 'x': os.environ.get('X'), "
                     "'home': 'HOME' in os.environ})"], timeout=60, env={"X": 7, "HOME": None})
    assert res.rows == [{"argv": [], "x": "7", "home": False}]


@pytest.mark.skipif(not netns.available(), reason=f"no network namespace: {netns.skip_reason()}")
def test_netns_wrap_only_loopback_up_and_isolation_env():
    res = child.run([sys.executable, "-c", textwrap.dedent("""
        import os, socket
        from vllm_dash.serving import child
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()   # lo is up
        links = [ln.split(":")[0].strip() for ln in open("/proc/net/dev").readlines()[2:]]
        child.emit({"links": sorted(links),
                    "env": {k: os.environ.get(k) for k in ("VLLM_HOST_IP", "GLOO_SOCKET_IFNAME")}})
        """)], timeout=60, wrap=netns.wrap)
    assert res.ok, res.log_tail()
    assert res.rows == [{"links": ["lo"],
                         "env": {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}}]
