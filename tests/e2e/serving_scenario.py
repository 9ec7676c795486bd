"""One `vllm-dash serve` scenario, run as a child process (vllm_dash.serving.child) INSIDE a
private network namespace (e2e_helpers.run_isolated; tools/gpu_serve_check.py on the GPU
machine) so that the server and its client share the namespace's loopback and nothing else:

    python serving_scenario.py spec.json

start the server -> wait for /health -> client checks (OpenAI client, raw HTTP) -> SIGTERM
-> one result row. Every loop and request is bounded in time.
The spec (JSON) has:
    server_cmd      the command that starts the server (a list; it must bind 127.0.0.1:port)
    port            its port
    model           the served model name the requests use
    ready_timeout   seconds to wait for /health
    log_file        where the server's stdout/stderr go
    completion      {"prompt": ..., "max_tokens": ...}: greedy completion, non-streaming and
                    streaming
    chat            {"content": ..., "max_tokens": ...}: the same through chat completions
    concurrent      {"n": 50, "max_tokens": [...], "repeats": [...]} or null
    bad_requests    true: send requests the server must refuse with 4xx
    max_model_len   the server's --max-model-len (for the too-long prompt)
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
import traceback

from vllm_dash.serving import child

REQUEST_TIMEOUT_S = 120.0


def wait_ready(proc, base: str, timeout: float) -> tuple[bool, float]:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False, time.monotonic() - t0
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return True, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False, time.monotonic() - t0


def openai_checks(base: str, spec: dict) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S)
    out: dict = {"models": [m.id for m in client.models.list().data]}
    model = spec["model"]

    c = spec["completion"]
    r = client.completions.create(model=model, prompt=c["prompt"], max_tokens=c["max_tokens"],
                                  temperature=0.0)
    out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                         "completion_tokens": r.usage.completion_tokens}
    chunks = client.completions.create(model=model, prompt=c["prompt"],
                                       max_tokens=c["max_tokens"], temperature=0.0, stream=True)
    pieces = [ch.choices[0].text for ch in chunks if ch.choices]
    out["completion_stream"] = {"text": "".join(pieces), "chunks": len(pieces)}

    h = spec["chat"]
    messages = [{"role": "user", "content": h["content"]}]
    r = client.chat.completions.create(model=model, messages=messages,
                                       max_tokens=h["max_tokens"], temperature=0.0)
    out["chat"] = {"text": r.choices[0].message.content, "role": r.choices[0].message.role,
                   "completion_tokens": r.usage.completion_tokens}
    chunks = client.chat.completions.create(model=model, messages=messages,
                                            max_tokens=h["max_tokens"], temperature=0.0,
                                            stream=True)
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    out["chat_stream"] = {"text": "".join(pieces), "chunks": len(pieces)}
    return out


def concurrent_checks(base: str, spec: dict) -> dict:
    """n requests at once (completions and chats, mixed prompt and output lengths)."""
    import httpx

    cfg = spec["concurrent"]
    n, max_tokens, repeats = cfg["n"], cfg["max_tokens"], cfg["repeats"]
    words = "the quick brown fox jumps over the lazy dog while the sun is shining "
    jobs = []
    for i in range(n):
        prompt = f"Request {i}: " + words * repeats[i % len(repeats)]
        mt = max_tokens[i % len(max_tokens)]
        if i % 3 == 2:
            jobs.append(("/v1/chat/completions", {
                "model": spec["model"], "messages": [{"role": "user", "content": prompt}],
                "max_tokens": mt, "temperature": 0.0}))
        else:
            jobs.append(("/v1/completions", {
                "model": spec["model"], "prompt": prompt, "max_tokens": mt,
                "temperature": 0.0, "stream": i % 5 == 4}))

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        def one(job):
            path, body = job
            t = time.monotonic()
            try:
                r = http.post(path, json=body)
                ok_body = r.status_code == 200 and (
                    "data: [DONE]" in r.text if body.get("stream") else bool(r.json()["choices"]))
                return {"status": r.status_code, "ok_body": ok_body,
                        "seconds": time.monotonic() - t}
            except Exception as exc:  # a timeout or a dropped connection: recorded, not raised
                return {"status": None, "error": repr(exc), "seconds": time.monotonic() - t}

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(one, jobs))
        wall = time.monotonic() - t0
    statuses = [r["status"] for r in results]
    return {
        "n": n, "wall_s": wall, "statuses": statuses,
        "ok": sum(1 for r in results if r["status"] == 200 and r["ok_body"]),
        "errors": [r.get("error") for r in results if r.get("error")][:5],
        "max_latency_s": max(r["seconds"] for r in results),
    }


def bad_request_checks(base: str, spec: dict) -> dict:
    import httpx

    model = spec["model"]
    too_long = "hello " * (spec["max_model_len"] * 2)
    cases = {
        "prompt_too_long": ("/v1/completions",
                            {"model": model, "prompt": too_long, "max_tokens": 4}),
        # within the character bound vLLM checks first: refused after tokenization
        "prompt_too_long_tokens": ("/v1/completions",
                                   {"model": model, "max_tokens": 4,
                                    "prompt": "hello " * (spec["max_model_len"] + 8)}),
        "max_tokens_negative": ("/v1/completions",
                                {"model": model, "prompt": "Hello", "max_tokens": -1}),
        "temperature_negative": ("/v1/completions",
                                 {"model": model, "prompt": "Hello", "max_tokens": 4,
                                  "temperature": -1.0}),
        "chat_max_tokens_negative": ("/v1/chat/completions",
                                     {"model": model, "max_tokens": -1,
                                      "messages": [{"role": "user", "content": "Hi"}]}),
        "unknown_model": ("/v1/completions",
                          {"model": "no-such-model", "prompt": "Hello", "max_tokens": 4}),
        "no_prompt": ("/v1/completions", {"model": model, "max_tokens": 4}),
    }
    out = {}
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as http:
        for name, (path, body) in cases.items():
            r = http.post(path, json=body)
            out[name] = {"status": r.status_code, "body": r.text[:300]}
        # still serving afterwards
        out["health_after"] = http.get("/health").status_code
        r = http.post("/v1/completions", json={"model": model, "prompt": "Hello",
                                               "max_tokens": 2, "temperature": 0.0})
        out["completion_after"] = r.status_code
    return out


def metrics_checks(base: str, spec: dict) -> dict:
    """A long-prompt request (many decode steps at a long context), then the vllm_dash_
    series on /metrics."""
    import httpx

    model = spec["model"]
    prompt = "The grass is green. The sky is blue. " * spec.get("metrics_prompt_repeats", 150)
    r = httpx.post(f"{base}/v1/completions", timeout=300,
                   json={"model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0,
                         "ignore_eos": True})
    text = httpx.get(f"{base}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm_dash_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return {"completion_status": r.status_code,
            "prompt_tokens": r.json().get("usage", {}).get("prompt_tokens"), "values": values}


def tcp_listeners() -> list:
    """[ip, port] of the listening TCP sockets of this network namespace (/proc/net/tcp*)."""
    import ipaddress

    out = []
    for name, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            rows = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state = fields[1], fields[3]
            if state != "0A":  # LISTEN
                continue
            ip_hex, port_hex = local.split(":")
            raw = bytes.fromhex(ip_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.append([str(ipaddress.ip_address(raw)), int(port_hex, 16)])
    return out


def stop(proc, timeout: float = 30.0) -> dict:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        return {"returncode": rc, "seconds": time.monotonic() - t0, "killed": True}
    return {"returncode": rc, "seconds": time.monotonic() - t0, "killed": False}


def scenario(spec: dict) -> dict:
    """The scenario of the module docstring; returns the result row."""
    base = f"http://127.0.0.1:{spec['port']}"
    result: dict = {"checks": {}}
    t0 = time.monotonic()
    with open(spec["log_file"], "w") as log:
        proc = subprocess.Popen(spec["server_cmd"], stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ.copy())
    try:
        ready, ready_s = wait_ready(proc, base, spec["ready_timeout"])
        result["ready"], result["ready_s"] = ready, ready_s
        if ready:
            import httpx

            result["health"] = httpx.get(f"{base}/health", timeout=10).status_code
            result["listeners"] = tcp_listeners()
            steps = [("openai", openai_checks)]
            if spec.get("concurrent"):
                steps.append(("concurrent", concurrent_checks))
            if spec.get("bad_requests"):
                steps.append(("bad_requests", bad_request_checks))
            if spec.get("metrics"):
                steps.append(("metrics", metrics_checks))
            for name, fn in steps:
                t = time.monotonic()
                try:
                    result["checks"][name] = fn(base, spec)
                except Exception:
                    result["checks"][name] = {"exception": traceback.format_exc()[-3000:]}
                result["checks"][name + "_s"] = time.monotonic() - t
        result["alive_before_stop"] = proc.poll() is None
        result["stop"] = stop(proc) if proc.poll() is None else {"returncode": proc.returncode,
                                                                  "exited_early": True}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result["total_s"] = time.monotonic() - t0
    return result


if __name__ == "__main__":
    child.main(scenario)
