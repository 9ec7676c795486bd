"""`vllm-dash serve` / `vllm-dash config` (vllm_dash.serving.cli), the Docker files, and
vLLM's OpenAI-compatible server started by `vllm-dash serve` on CPU with DASH.

* CLI: the `vllm serve` argument lists that plan_serve builds (one subprocess computes all
  cases: importing vLLM's parser takes ~10 s, and vLLM is kept out of the pytest process),
  and the console script itself (--help, config, --print-cmd, a bad DASH config -> exit 2).
  None of these starts a server.
* Docker: docker cannot run here, so the Dockerfile is parsed (known instructions, the base
  tag is the supported vLLM release, ENTRYPOINT `vllm-dash serve`) and its default command
  line is checked against `vllm-dash serve --print-cmd`; compose.yaml is parsed as YAML.
* Servers: each scenario (start, wait for /health, OpenAI-client and raw HTTP checks, 50
  concurrent requests, bad requests, SIGTERM) is ONE child process (serving_scenario.py) run
  inside a private network namespace (e2e_helpers.run_isolated), since vLLM 0.26 also listens
  on all interfaces; the server binds 127.0.0.1 there and the test asserts on its result row.
"""
from __future__ import annotations

import ast
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from e2e_helpers import engine_env, failure, needs_netns, run_isolated
from vllm_dash.config import DashConfig
from vllm_dash.serving import child, netns
from vllm_dash.serving.models import DEFAULT_MODEL_NAME

REPO = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
CLI_TIMEOUT_S = 180
SCENARIO_TIMEOUT_S = 900     # hang guard: the default-model scenario took 270 s on a slow host


def _cli_env(**extra) -> dict:
    """Environment changes for CLI subprocesses (None removes a variable): no Triton
    interpreter (tests/cpu's conftest sets it), no inherited vllm-dash settings."""
    env = {"TRITON_INTERPRET": None, "VLLM_DASH_HOST": None, "VLLM_DASH_CACHE": None,
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _vllm_dash_exe() -> str:
    exe = pathlib.Path(sys.executable).parent / "vllm-dash"
    assert exe.is_file(), f"{exe} missing: reinstall the package (pip install -e .)"
    return str(exe)


def run_cli(args, *, env=None, timeout=CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """The `vllm-dash` console script (never starts a server in these tests)."""
    return subprocess.run([_vllm_dash_exe(), *args], capture_output=True, text=True,
                          env=child.child_env(env or _cli_env()), timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------------------
# plan_serve: the argument lists (all cases in one subprocess)
# ---------------------------------------------------------------------------------------

PLAN_SCRIPT = r'''
import json, os
from vllm_dash.serving import child, cli

cases = child.read_spec()
out = {}
for name, case in cases.items():
    old = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update(case.get("env", {}))
    try:
        plan = cli.plan_serve(case["args"], on_cpu=case.get("on_cpu", True))
        ns = cli._vllm_serve_parser().parse_args(plan.argv)   # what vLLM will see
        out[name] = {"argv": plan.argv, "env": plan.env, "default_model": plan.default_model,
                     "ns": {k: getattr(ns, k) for k in ("model_tag", "model", "host", "port",
                            "served_model_name", "max_model_len", "attention_backend",
                            "additional_config")}}
    except cli.ServeError as exc:
        out[name] = {"error": str(exc)}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
child.emit(json.loads(json.dumps(out, default=str)))
'''

CPU_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_HOST_IP", "GLOO_SOCKET_IFNAME")

PLAN_CASES = {
    "default": {"args": []},
    "positional": {"args": ["/m"]},
    "model_option": {"args": ["--model", "/m"]},
    "overrides": {"args": ["/m", "--host", "127.0.0.2", "--port", "9001", "--attention-backend",
                           "FLEX_ATTENTION", "--max-model-len", "256",
                           "--served-model-name", "x", "--enforce-eager"]},
    "override_spellings": {"args": ["/m", "--port=9001", "--max_model_len", "128",
                                    "--attention-config.backend", "FLEX_ATTENTION"]},
    "default_model_overrides": {"args": ["--served-model-name", "mine", "--max-model-len",
                                         "1024"]},
    "merge": {"args": ["/m", "--additional-config", '{"x": 1, "dash": {"alpha": 1.7}}',
                       "--dash-config", '{"sink_blocks": 2}']},
    "dash_config_wins": {"args": ["/m", "--additional-config", '{"dash": {"alpha": 1.7}}',
                                  "--dash-config={\"alpha\": 1.9}"]},
    "dotted": {"args": ["/m", "--additional-config.dash.alpha", "1.8",
                        "--dash_config", '{"sink_blocks": 0}']},
    "additional_kept": {"args": ["/m", "--additional-config", '{"dash": {"score_scale": 0.5}}']},
    "host_env": {"args": ["/m"], "env": {"VLLM_DASH_HOST": "127.0.0.3"}},
    "gpu": {"args": ["/m"], "on_cpu": False},
    "bad_key": {"args": ["/m", "--dash-config", '{"alpah": 1.5}']},
    "bad_value": {"args": ["/m", "--dash-config", '{"alpha": 3}']},
    "bad_json": {"args": ["/m", "--dash-config", "{alpha: 1.5}"]},
    "bad_not_object": {"args": ["/m", "--dash-config", "[1, 2]"]},
    "bad_in_additional": {"args": ["/m", "--additional-config",
                                   '{"dash": {"max_blocks": 1, "sink_blocks": 1}}']},
    "bad_missing_value": {"args": ["/m", "--dash-config"]},
}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    env = {**_cli_env(VLLM_DASH_CACHE=tmp / "cache"), **dict.fromkeys(CPU_KEYS)}
    res = child.run([sys.executable, "-c", PLAN_SCRIPT], PLAN_CASES, env=env,
                    timeout=CLI_TIMEOUT_S, cwd=tmp)
    assert res.ok and res.rows, f"{res.error}\n{res.log_tail()}"
    result = res.rows[-1]
    result["_cache"] = str(tmp / "cache")
    return result


def _opt(argv, name):
    """Values of option `name` (`--x v` form) in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def test_plan_defaults(plans):
    p = plans["default"]
    model_dir = str(pathlib.Path(plans["_cache"]) / "models" / DEFAULT_MODEL_NAME)
    assert p["default_model"] is True
    assert p["argv"] == [model_dir, "--served-model-name", DEFAULT_MODEL_NAME,
                         "--max-model-len", "8192", "--attention-backend", "CUSTOM",
                         "--host", "127.0.0.1", "--port", "8000"]
    ns = p["ns"]
    assert ns["model_tag"] == model_dir and ns["attention_backend"] == "CUSTOM"
    assert (ns["host"], ns["port"], ns["max_model_len"]) == ("127.0.0.1", 8000, 8192)
    assert ns["served_model_name"] == [DEFAULT_MODEL_NAME]
    assert ns["additional_config"] == {}  # DashConfig's defaults
    assert p["env"] == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_HOST_IP": "127.0.0.1",
                        "GLOO_SOCKET_IFNAME": "lo"}
    assert plans["gpu"]["env"] == {}


def test_plan_user_model(plans):
    p = plans["positional"]
    assert p["default_model"] is False
    assert p["argv"] == ["/m", "--attention-backend", "CUSTOM", "--host", "127.0.0.1",
                         "--port", "8000"]
    p = plans["model_option"]
    assert p["default_model"] is False
    assert p["argv"][:2] == ["--model", "/m"] and "--served-model-name" not in p["argv"]
    assert p["ns"]["model"] == "/m"


def test_plan_user_overrides_kept(plans):
    args = PLAN_CASES["overrides"]["args"]
    assert plans["overrides"]["argv"] == args  # nothing added, nothing reordered
    ns = plans["overrides"]["ns"]
    assert (ns["host"], ns["port"], ns["attention_backend"]) == ("127.0.0.2", 9001,
                                                                 "FLEX_ATTENTION")
    p = plans["override_spellings"]
    assert p["argv"] == [*PLAN_CASES["override_spellings"]["args"], "--host", "127.0.0.1"]
    assert p["ns"]["port"] == 9001 and p["ns"]["max_model_len"] == 128
    p = plans["default_model_overrides"]
    assert p["default_model"] is True
    assert _opt(p["argv"], "--served-model-name") == ["mine"]
    assert _opt(p["argv"], "--max-model-len") == ["1024"]
    assert plans["host_env"]["ns"]["host"] == "127.0.0.3"


def test_plan_dash_config_merge(plans):
    p = plans["merge"]
    assert len(_opt(p["argv"], "--additional-config")) == 1
    assert p["ns"]["additional_config"] == {"x": 1, "dash": {"alpha": 1.7, "sink_blocks": 2}}
    assert plans["dash_config_wins"]["ns"]["additional_config"] == {"dash": {"alpha": 1.9}}
    p = plans["dotted"]
    assert not any(a.startswith("--additional-config.") for a in p["argv"])
    assert p["ns"]["additional_config"] == {"dash": {"alpha": 1.8, "sink_blocks": 0}}
    p = plans["additional_kept"]
    assert p["argv"][:3] == PLAN_CASES["additional_kept"]["args"]
    assert p["ns"]["additional_config"] == {"dash": {"score_scale": 0.5}}


@pytest.mark.parametrize("case,needle", [
    ("bad_key", "alpah"), ("bad_value", "alpha"), ("bad_json", "--dash-config"),
    ("bad_not_object", "--dash-config"), ("bad_in_additional", "max_blocks"),
    ("bad_missing_value", "--dash-config"),
])
def test_plan_bad_dash_config(plans, case, needle):
    err = plans[case].get("error")
    assert err is not None, plans[case]
    assert needle in err and "\n" not in err


# ---------------------------------------------------------------------------------------
# The console script
# ---------------------------------------------------------------------------------------

def test_cli_help_and_config():
    top = run_cli(["--help"])
    assert top.returncode == 0 and "serve" in top.stdout and "config" in top.stdout
    serve = run_cli(["serve", "--help"])
    assert serve.returncode == 0, serve.stderr
    for text in ("--dash-config", "--print-cmd", "Any `vllm serve` argument is accepted",
                 "--attention-backend", "127.0.0.1", DEFAULT_MODEL_NAME):
        assert text in serve.stdout, text
    cfg = run_cli(["config"])
    assert cfg.returncode == 0, cfg.stderr
    defaults = DashConfig()
    for key in DashConfig.keys():
        assert re.search(rf"^{key} \(default {re.escape(repr(getattr(defaults, key)))}\): ",
                         cfg.stdout, re.M), key
    assert run_cli(["nonsense"]).returncode == 2
    assert run_cli([]).returncode == 2


def test_cli_print_cmd(plans, tmp_path):
    args = ["/m", "--port", "9002", "--dash-config", '{"score_scale": 0.5}']
    proc = run_cli(["serve", "--print-cmd", *args], env=_cli_env(VLLM_DASH_CACHE=tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm serve "), proc.stdout
    argv = shlex.split(lines[0])[2:]
    assert argv == ["/m", "--port", "9002", "--attention-backend", "CUSTOM",
                    "--additional-config", '{"dash":{"score_scale":0.5}}', "--host", "127.0.0.1"]
    # the same function as the plan cases (and the real start)
    assert shlex.split(run_cli(["serve", "--print-cmd", "/m"]).stdout)[2:] == \
        plans["positional"]["argv"]


def test_cli_bad_config_exits_2_before_vllm_starts():
    # the real start path (no --print-cmd): the error comes before any engine is built
    cmd = ["serve", "/nonexistent-model", "--dash-config", '{"sink_blocks": -1}']
    if netns.available():
        proc = run_isolated([_vllm_dash_exe(), *cmd], env={"TRITON_INTERPRET": None},
                            timeout=CLI_TIMEOUT_S, cwd=REPO)
    else:  # vllm-dash exits before starting vLLM; nothing listens
        proc = run_cli(cmd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("vllm-dash serve: error:")]
    assert len(errors) == 1 and "sink_blocks" in errors[0], proc.stderr[-3000:]
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------
# Docker files (docker cannot run here: parse them)
# ---------------------------------------------------------------------------------------

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY",
                       "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD",
                       "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(instruction, arguments) pairs with continuation lines joined, and the comments."""
    instructions, comments, pending = [], [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and line.startswith("#"):
            comments.append(line[1:].strip())
            continue
        if not line and not pending:
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        assert word.isupper(), f"instruction not in upper case: {full!r}"
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions, comments


def parse_env(args: str) -> dict:
    return dict(tok.split("=", 1) for tok in shlex.split(args))


def supported_vllm_version() -> str:
    """The pinned lower bound of pyproject's vLLM range, checked against compat.SUPPORTED_VLLM."""
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"vllm>=([0-9.]+),<', text)
    assert m, "no vllm>=X,<Y range in pyproject.toml"
    version = m.group(1)
    tree = ast.parse((REPO / "vllm_dash" / "compat.py").read_text())
    supported = next(ast.literal_eval(node.value) for node in tree.body
                     if isinstance(node, ast.Assign)
                     and any(getattr(t, "id", None) == "SUPPORTED_VLLM" for t in node.targets))
    assert version.startswith(tuple(supported)), (version, supported)
    return version


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((REPO / "docker" / "Dockerfile").read_text())


def test_dockerfile_parses(dockerfile):
    instructions, _ = dockerfile
    names = [name for name, _ in instructions]
    assert set(names) <= DOCKER_INSTRUCTIONS, set(names) - DOCKER_INSTRUCTIONS
    base = f"vllm/vllm-openai:v{supported_vllm_version()}"
    froms = [args.split()[0] for name, args in instructions if name == "FROM"]
    assert froms and all(f == base for f in froms), froms
    assert names[0] == "FROM"
    final = names[len(names) - 1 - names[::-1].index("FROM"):]  # the last stage
    users = [args for name, args in instructions[len(names) - len(final):] if name == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image should not run as root"
    for name, args in instructions:
        if name == "COPY" and not args.startswith("--from"):
            for src in shlex.split(args)[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} missing"
    for name, args in instructions:
        if name in ("ENTRYPOINT", "CMD"):
            assert isinstance(json.loads(args), list), f"{name} must be in exec (JSON) form"
    assert (REPO / "docker" / "Dockerfile.dockerignore").is_file()


def test_dockerfile_entrypoint_is_print_cmd(dockerfile):
    instructions, comments = dockerfile
    entrypoint = [json.loads(a) for n, a in instructions if n == "ENTRYPOINT"][-1]
    cmd = [json.loads(a) for n, a in instructions if n == "CMD"][-1]
    assert entrypoint == ["vllm-dash", "serve"]
    env = {}
    for name, args in instructions:
        if name == "ENV":
            env.update(parse_env(args))
    assert env.get("VLLM_DASH_HOST") == "0.0.0.0"  # inside the container; compose publishes
    # the image runs `vllm-dash serve CMD`: what --print-cmd derives for CMD (with the
    # image's environment) must be the command the Dockerfile documents
    proc = run_cli(["serve", "--print-cmd", *cmd],
                   env=_cli_env(**{k: env[k] for k in ("VLLM_DASH_HOST", "VLLM_DASH_CACHE")}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    derived = proc.stdout.strip()
    documented = [c for c in comments if c.startswith("vllm serve ")]
    assert documented == [derived]
    argv = shlex.split(derived)
    assert argv[argv.index("--attention-backend") + 1] == "CUSTOM"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[2].startswith(env["VLLM_DASH_CACHE"] + "/")


def test_compose_file(dockerfile):
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    (name, svc), = compose["services"].items()
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               for d in devices), devices
    test = svc["healthcheck"]["test"]
    assert "/health" in (" ".join(test) if isinstance(test, list) else test)
    assert svc["ports"] and all(str(p).startswith("127.0.0.1:") for p in svc["ports"])
    # the cache volume is mounted where the image keeps the Hugging Face cache
    instructions, _ = dockerfile
    env = {}
    for n, a in instructions:
        if n == "ENV":
            env.update(parse_env(a))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert any(env["HF_HOME"].startswith(target + "/") for target in mounts), (mounts, env)
    assert set(mounts.values()) <= set(compose.get("volumes", {}))
    build = svc["build"]
    assert (REPO / "docker" / build["context"] / build["dockerfile"]).resolve() == \
        (REPO / "docker" / "Dockerfile").resolve()


# ---------------------------------------------------------------------------------------
# Servers (each scenario inside its own network namespace)
# ---------------------------------------------------------------------------------------

def run_scenario(tmp_path, cache_root, spec: dict, env: dict) -> dict:
    """One serving_scenario.py child in a private network namespace; its result row, with
    the server's log."""
    spec = {**spec, "log_file": str(tmp_path / "server.log")}
    res = run_isolated([sys.executable, str(HERE / "serving_scenario.py")], spec,
                       env=engine_env(cache_root, VLLM_DASH_HOST=None, **env),
                       timeout=SCENARIO_TIMEOUT_S, cwd=tmp_path)
    log = (tmp_path / "server.log").read_text() if (tmp_path / "server.log").exists() else ""
    assert res.ok and res.rows, failure(res, "scenario",
                                        f"\n--- server log (tail) ---\n{log[-6000:]}")
    result = res.rows[-1]
    result["server_log"], result["server_log_tail"] = log, log[-6000:]
    print(f"serving scenario: wall {res.seconds:.1f} s, ready {result.get('ready_s', -1):.1f} s, "
          + ", ".join(f"{k} {v:.1f} s" for k, v in result["checks"].items() if k.endswith("_s")))
    return result


def check_common(r: dict, *, model: str, port: int, max_tokens: int) -> None:
    log = r["server_log_tail"]
    assert r["ready"], f"server not ready after {r['ready_s']:.0f} s\n{log}"
    assert r["health"] == 200
    # the HTTP server listens on 127.0.0.1 only
    assert ["127.0.0.1", port] in r["listeners"], r["listeners"]
    assert not any(p == port and ip != "127.0.0.1" for ip, p in r["listeners"]), r["listeners"]
    for name in ("openai", "concurrent", "bad_requests"):
        assert "exception" not in r["checks"][name], r["checks"][name]

    o = r["checks"]["openai"]
    assert o["models"] == [model]
    assert o["completion"]["completion_tokens"] <= max_tokens and o["completion"]["text"]
    assert o["completion_stream"]["text"] == o["completion"]["text"]  # greedy: same text
    assert o["completion_stream"]["chunks"] >= 2
    assert o["chat"]["role"] == "assistant" and o["chat"]["text"]
    assert o["chat_stream"]["text"] == o["chat"]["text"]

    c = r["checks"]["concurrent"]
    assert c["ok"] == c["n"] == 50, c
    assert not any(s is None or s >= 500 for s in c["statuses"]), c

    b = r["checks"]["bad_requests"]
    for case in ("prompt_too_long", "prompt_too_long_tokens", "max_tokens_negative",
                 "temperature_negative", "chat_max_tokens_negative", "no_prompt"):
        assert b[case]["status"] == 400, (case, b[case])
    assert b["unknown_model"]["status"] == 404, b["unknown_model"]
    assert b["health_after"] == 200 and b["completion_after"] == 200

    stop = r["stop"]
    assert r["alive_before_stop"], log
    assert stop["returncode"] == 0 and not stop["killed"], (stop, log)
    assert stop["seconds"] < 10, stop


SCENARIO_COMMON = {
    "ready_timeout": 240,
    "completion": {"prompt": "The capital of France is", "max_tokens": 8},
    "chat": {"content": "What is the capital of France?", "max_tokens": 12},
    "concurrent": {"n": 50, "max_tokens": [1, 3, 8, 16], "repeats": [1, 2, 5, 9]},
    "bad_requests": True,
}


@needs_netns
@pytest.mark.slow
def test_server_tiny_model(tmp_path, tiny_llama_dir, vllm_cache_root):
    port = 8011
    spec = {
        **SCENARIO_COMMON,
        # the console script, a user model, user options kept
        "server_cmd": [_vllm_dash_exe(), "serve", str(tiny_llama_dir), "--served-model-name",
                       "tiny", "--max-model-len", "512", "--port", str(port)],
        "port": port, "model": "tiny", "max_model_len": 512,
    }
    r = run_scenario(tmp_path, vllm_cache_root, spec, env={})
    check_common(r, model="tiny", port=port, max_tokens=8)
    assert "DASH attention backend" in r["server_log"]


@needs_netns
@pytest.mark.slow
def test_server_default_model(tmp_path, smollm2_dir, vllm_cache_root):
    # `python -m vllm_dash.serving.cli serve` (what `make serve` runs) with no arguments:
    # the embedded model (already converted by the fixture into this cache), 127.0.0.1:8000
    spec = {
        **SCENARIO_COMMON,
        "server_cmd": [sys.executable, "-m", "vllm_dash.serving.cli", "serve"],
        "port": 8000, "model": DEFAULT_MODEL_NAME, "max_model_len": 8192, "metrics": True,
    }
    r = run_scenario(tmp_path, vllm_cache_root, spec,
                     env={"VLLM_DASH_CACHE": str(smollm2_dir.parent.parent)})
    check_common(r, model=DEFAULT_MODEL_NAME, port=8000, max_tokens=8)
    o = r["checks"]["openai"]
    assert "Paris" in o["completion"]["text"], o["completion"]
    assert "Paris" in o["chat"]["text"], o["chat"]
    m = r["checks"]["metrics"]
    assert m["completion_status"] == 200 and m["prompt_tokens"] > 1500, m
    v = m["values"]
    assert 0.0 < v["vllm_dash_decode_density_mean"] <= 1.0, v
    assert v["vllm_dash_stats_samples_total"] >= 1 and v["vllm_dash_context_tokens_total"] > 0, v
    assert len([k for k in v if k.startswith("vllm_dash_decode_density{")]) == 30, v
    assert "DASH attention backend" in r["server_log"]
