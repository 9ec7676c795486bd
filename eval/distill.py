"""`vllm-dash distill MODEL --out FILE`: fit attention-pooling block summaries on the frozen
model (issue 13, item 3).

What is fitted: per (attention layer, KV head) a pooling vector w (the summary file's
``pool`` [L, Hk, D]); a block's summary is kbar = sum_t softmax_t(w . k_t / sqrt(D)) k_t
over its keys (kernels/reference_summaries.py, summary "attn_pool"). w = 0 is mean pooling,
the start of the fit.

Target: the model's own dense attention at sampled decode positions p of natural text
(eval/text.py, slice "distill": Python stdlib docstrings; recall is measured on the other
slice). For each (layer, KV head, position) the target is the block mass of
kernels/recall.block_mass (computed as capture.dense_block_mass) averaged over the GQA
group, over the candidate blocks: the complete blocks before p's block that are not sink
blocks (the current block and the sinks are always selected, so their mass says nothing
about the summaries), renormalised.

Loss: KL(target || softmax_c(t_lh * u_hc)) with stage 1's score u_hc = scale * q_h . kbar_c
for each query head h of the group, averaged over layers, heads and positions; t_lh is a
per-(layer, KV head) temperature fitted along (a softmax needs one; DASH's own score_scale
and standardisation are applied on top in serving, so t is recorded in the metadata only,
not as a ``score_scale`` tensor). Queries and keys are captured once (eval/capture.py); the
fit runs on them with Adam: first t alone with w = 0 (the mean-pooling baseline at its best
temperature), then w and t together. Held out: the last quarter of the windows of each
length; the file's metadata reports the held-out loss of mean pooling (t = 1 and fitted t)
and of the fitted pooling.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from vllm_dash.eval import capture as cap_mod
from vllm_dash.eval import provenance
from vllm_dash.eval import text as text_mod

__all__ = ["DEFAULTS", "FORMAT", "WindowData", "window_data", "pool_summaries", "kl_loss",
           "fit", "distill", "write_summary_file", "distill_main", "progress_bar"]

FORMAT = "vllm-dash-summaries/1"
#: `vllm-dash distill` defaults: SmolLM2-135M ~6-10 min on 2 CPU cores (docs/distill.md).
#: lengths None: one length, the model's max_position_embeddings capped at MAX_DEFAULT_LENGTH.
#: The vectors pool post-RoPE keys, so they must see the rotations of every position they
#: will pool: windows of 2K/4K gave no recall gain at 8K, 8K windows gain at 4K and 8K.
MAX_DEFAULT_LENGTH = 8192
DEFAULTS = {"lengths": None, "windows": 4, "positions": 128, "steps": 200,
            "lr": 0.03, "block_size": 64, "sink_blocks": 1, "seed": 0}


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm on stderr when installed, else a minimal counter; .update(n) / .close()."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled,
                    dynamic_ncols=True)
    except ImportError:
        return _SimpleBar(total, desc, enabled)


class _SimpleBar:
    def __init__(self, total, desc, enabled):
        self.n, self.total, self.desc, self.enabled = 0, total, desc, enabled

    def update(self, n=1):
        self.n += n
        if self.enabled:
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def set_postfix_str(self, s):
        pass

    def close(self):
        if self.enabled:
            print(file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
@dataclass
class WindowData:
    """One window, all layers, complete blocks only (fp32, on the fit's device).
    keys [L, Hk, nb, B, D]; q [L, Hq, P, D]; target [L, Hk, P, nb] (sums to 1 over the
    candidates); cand [P, nb] bool; scale [L] (the layers' softmax scales)."""
    keys: torch.Tensor
    q: torch.Tensor
    target: torch.Tensor
    cand: torch.Tensor
    scale: torch.Tensor


def candidates(positions, n_blocks: int, block_size: int, sink_blocks: int) -> torch.Tensor:
    """[P, n] bool: complete blocks before the position's own block, past the sinks."""
    c = torch.arange(n_blocks, device=positions.device)
    return (c[None, :] >= sink_blocks) & (c[None, :] < (positions // block_size)[:, None])


def window_data(cap, *, block_size: int, sink_blocks: int, device) -> WindowData:
    """The fit's tensors of one captured window."""
    T = cap.keys[0].shape[1]
    nb = T // block_size
    pos = cap.positions.to(device)
    cand = candidates(pos, nb, block_size, sink_blocks)
    keys, qs, targets = [], [], []
    for k, q, s in zip(cap.keys, cap.queries, cap.scales):
        k = k.to(device).float()
        q = q.to(device).float()
        Hk = k.shape[0]
        m = cap_mod.dense_block_mass(q, k, pos, block_size=block_size, scale=s)[..., :nb]
        m = m.view(len(pos), Hk, -1, nb).mean(2).transpose(0, 1)          # [Hk, P, nb]
        m = torch.where(cand[None], m, 0.0)
        targets.append(m / m.sum(-1, keepdim=True).clamp_min(1e-30))
        keys.append(k[:, :nb * block_size].reshape(k.shape[0], nb, block_size, -1))
        qs.append(q)
    return WindowData(keys=torch.stack(keys), q=torch.stack(qs), target=torch.stack(targets),
                      cand=cand, scale=torch.tensor(cap.scales, device=device))


# ----------------------------------------------------------------------------- loss
def pool_summaries(keys: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Attention-pooled summaries of complete blocks, all layers at once:
    keys [L, Hk, nb, B, D], pool [L, Hk, D] -> [L, Hk, nb, D]. Same values as
    reference.block_summaries(..., summary="attn_pool", pool=pool[l]) (a test checks)."""
    D = keys.shape[-1]
    logits = torch.einsum("lhnbd,lhd->lhnb", keys, pool) / math.sqrt(D)
    return torch.einsum("lhnb,lhnbd->lhnd", torch.softmax(logits, dim=-1), keys)


def kl_loss(d: WindowData, pool: torch.Tensor, log_t: torch.Tensor,
            per_layer: bool = False) -> torch.Tensor:
    """Mean KL(target || stage-1 softmax) over layers, query heads and the positions
    with at least 2 candidate blocks ([L] per layer with ``per_layer``)."""
    L, Hq = d.q.shape[:2]
    G = Hq // pool.shape[1]
    kbar = pool_summaries(d.keys, pool).repeat_interleave(G, dim=1)      # [L, Hq, nb, D]
    u = d.scale[:, None, None, None] * torch.einsum("lhpd,lhnd->lhpn", d.q, kbar)
    t = log_t.exp().repeat_interleave(G, dim=1)[..., None, None]
    logp = torch.log_softmax((t * u).masked_fill(~d.cand, float("-inf")), dim=-1)
    tgt = d.target.repeat_interleave(G, dim=1)
    logp = torch.where(d.cand, logp, 0.0)
    kl = (torch.special.xlogy(tgt, tgt) - tgt * logp).sum(-1)            # [L, Hq, P]
    valid = (d.cand.sum(-1) >= 2).float()                                # [P]
    per = (kl * valid).sum((1, 2)) / (Hq * valid.sum().clamp_min(1.0))   # [L]
    return per if per_layer else per.mean()


def mean_loss(data: Sequence[WindowData], pool, log_t) -> float:
    with torch.no_grad():
        return float(sum(kl_loss(d, pool, log_t) for d in data) / max(len(data), 1))


def fit(data: Sequence[WindowData], pool: torch.Tensor, log_t: torch.Tensor, *, steps: int,
        lr: float, train_pool: bool, bar=None, curve: Optional[list] = None,
        stage: str = "") -> tuple:
    """Adam on the mean loss over ``data`` (full batch); returns (pool, log_t)."""
    pool = pool.clone().requires_grad_(train_pool)
    log_t = log_t.clone().requires_grad_(True)
    opt = torch.optim.Adam([pool, log_t] if train_pool else [log_t], lr=lr)
    every = max(1, steps // 20)
    for step in range(steps):
        opt.zero_grad()
        loss = sum(kl_loss(d, pool, log_t) for d in data) / len(data)
        loss.backward()
        opt.step()
        if curve is not None and (step % every == 0 or step == steps - 1):
            curve.append([stage, step, float(f"{float(loss.detach()):.5g}")])
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{stage} loss {float(loss.detach()):.4g}")
    return pool.detach(), log_t.detach()


# ----------------------------------------------------------------------------- driver
def _capture_windows(lm, tok, *, lengths, windows, positions, seed, block_size, sink_blocks,
                     device, bar) -> tuple:
    """(train, held) WindowData lists: per length ``windows`` windows of the distill
    slice, all cut from one text stream (no two windows share text); the last
    max(1, windows // 4) of each length are held out (none if windows is 1)."""
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    all_ids = text_mod.cut_windows(tok, "distill", [T for T in lengths for _ in range(windows)],
                                   seed)
    n_held = max(1, windows // 4) if windows > 1 else 0
    for j, T in enumerate(lengths):
        for i, w in enumerate(all_ids[j * windows:(j + 1) * windows]):
            pos = cap_mod.sample_positions(T, positions, gen, low=max(T // 4,
                                           (sink_blocks + 2) * block_size))
            c = cap_mod.capture(lm, w, pos)
            d = window_data(c, block_size=block_size, sink_blocks=sink_blocks, device=device)
            (held if i >= windows - n_held else train).append(d)
            bar.update(1)
    return train, held


def distill(model=None, *, lengths=DEFAULTS["lengths"], windows=DEFAULTS["windows"],
            positions=DEFAULTS["positions"], steps=DEFAULTS["steps"], lr=DEFAULTS["lr"],
            device="cpu", seed=DEFAULTS["seed"], block_size=DEFAULTS["block_size"],
            sink_blocks=DEFAULTS["sink_blocks"], progress=True) -> tuple:
    """Capture, fit; returns ({"pool": fp32 [L, Hk, D]}, metadata dict of str)."""
    t0 = time.time()
    if lengths is not None:            # bad arguments fail before the model loads
        _check_args(lengths, windows, positions, steps, block_size, sink_blocks, lr)
    path = cap_mod.resolve_model(model)
    lm, tok = cap_mod.load_model(path, device)
    if lengths is None:
        max_pos = getattr(lm.config, "max_position_embeddings", None) or MAX_DEFAULT_LENGTH
        lengths = (min(int(max_pos), MAX_DEFAULT_LENGTH),)
    _check_args(lengths, windows, positions, steps, block_size, sink_blocks, lr)
    bar = progress_bar(len(lengths) * windows, "distill: capture", progress)
    try:
        train, held = _capture_windows(lm, tok, lengths=list(lengths), windows=windows,
                                       positions=positions, seed=seed, block_size=block_size,
                                       sink_blocks=sink_blocks, device=device, bar=bar)
    finally:
        bar.close()
    del lm
    L, Hk, D = train[0].keys.shape[0], train[0].keys.shape[1], train[0].keys.shape[-1]
    pool0 = torch.zeros(L, Hk, D, device=device)
    t_init = torch.zeros(L, Hk, device=device)
    curve: list = []
    steps_t = max(1, steps // 3)
    bar = progress_bar(steps_t + steps, "distill: fit", progress)
    try:
        _, log_t_mean = fit(train, pool0, t_init, steps=steps_t, lr=lr, train_pool=False,
                            bar=bar, curve=curve, stage="mean")
        pool, log_t = fit(train, pool0, log_t_mean, steps=steps, lr=lr, train_pool=True,
                          bar=bar, curve=curve, stage="attn_pool")
    finally:
        bar.close()
    check = held or train
    losses = {"on": "held-out" if held else "train (no held-out windows)",
              "mean_t1": mean_loss(check, pool0, t_init),
              "mean": mean_loss(check, pool0, log_t_mean),
              "attn_pool": mean_loss(check, pool, log_t),
              "train_mean": mean_loss(train, pool0, log_t_mean),
              "train_attn_pool": mean_loss(train, pool, log_t)}
    meta = {"format": FORMAT, "model": os.path.basename(os.path.normpath(str(model or path))),
            "model_dir": os.path.basename(os.path.normpath(path)),   # no machine paths
            "layers": str(L), "kv_heads": str(Hk), "head_size": str(D),
            "data": text_mod.describe("distill", seed),
            "lengths": json.dumps(list(lengths)), "windows": str(windows),
            "positions": str(positions), "seed": str(seed), "steps": str(steps),
            "lr": str(lr), "block_size": str(block_size), "sink_blocks": str(sink_blocks),
            "loss": "KL(group-mean block mass over complete non-sink blocks before the "
                    "query's block || softmax(t * scale * q.kbar)), mean over layers, "
                    "query heads, positions",
            "loss_curve": json.dumps(curve), "held_out": json.dumps(losses),
            "stage1_temperature": json.dumps(log_t.exp().cpu().tolist()),
            "device": device, "wall_s": f"{time.time() - t0:.1f}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "vllm_dash": provenance.versions().get("vllm-dash", "unknown"),
            "commit": provenance.commit()}
    return {"pool": pool.float().cpu().contiguous()}, meta


def _check_args(lengths, windows, positions, steps, block_size, sink_blocks, lr) -> None:
    def need(ok, key, value, rule):
        if not ok:
            raise ValueError(f"{key}={value!r} is invalid: must be {rule}")
    need(block_size in (16, 32, 64, 128, 256), "block_size", block_size,
         "one of [16, 32, 64, 128, 256]")
    need(isinstance(sink_blocks, int) and sink_blocks >= 0, "sink_blocks", sink_blocks,
         "an integer >= 0")
    need(len(lengths) > 0 and all(isinstance(T, int) and T >= (sink_blocks + 3) * block_size
                                  for T in lengths), "lengths", list(lengths),
         f"integers >= (sink_blocks + 3) * block_size = {(sink_blocks + 3) * block_size}")
    for key, v in (("windows", windows), ("positions", positions), ("steps", steps)):
        need(isinstance(v, int) and v >= 1, key, v, "an integer >= 1")
    need(lr > 0, "lr", lr, "a number > 0")


def write_summary_file(out: str, tensors: dict, meta: dict) -> None:
    """Write the safetensors summary file (atomically: a temp file, then rename)."""
    from safetensors.torch import save_file

    out = os.path.expanduser(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, out)


# ----------------------------------------------------------------------------- CLI
def int_list(text: str) -> list:
    """argparse type: "2048,4096" -> [2048, 4096]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def distill_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    ap = argparse.ArgumentParser(
        prog="vllm-dash distill",
        description="Fit per-(layer, KV head) attention-pooling vectors (summary "
                    "'attn_pool') to the model's own dense attention on Python stdlib "
                    "docstrings; writes a safetensors summary file for the DASH config key "
                    "summary_file. See docs/distill.md.")
    ap.add_argument("model", nargs="?", default=None,
                    help="Hugging Face model folder, or 'smollm2-135m-instruct' (default: "
                         "the embedded model)")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--lengths", type=int_list, default=None,
                    help="window lengths in tokens, comma-separated (default: the model's "
                         f"max_position_embeddings, at most {MAX_DEFAULT_LENGTH}: the vectors "
                         "must see the RoPE phases of every position they will pool)")
    ap.add_argument("--windows", type=int, default=d["windows"],
                    help=f"text windows per length; the last quarter is held out "
                         f"(default {d['windows']})")
    ap.add_argument("--positions", type=int, default=d["positions"],
                    help=f"sampled decode positions per window (default {d['positions']})")
    ap.add_argument("--steps", type=int, default=d["steps"],
                    help=f"Adam steps fitting the pooling vectors (default {d['steps']}; "
                         "plus a third as many fitting the temperature alone first)")
    ap.add_argument("--lr", type=float, default=d["lr"], help=f"Adam step (default {d['lr']})")
    ap.add_argument("--device", choices=cap_mod.DEVICES, default=None,
                    help="cpu (fp32) or cuda (bf16); default cuda when available")
    ap.add_argument("--seed", type=int, default=d["seed"], help="text order and positions")
    ap.add_argument("--block-size", type=int, default=d["block_size"],
                    help=f"KV block size the summaries are for (default {d['block_size']})")
    ap.add_argument("--sink-blocks", type=int, default=d["sink_blocks"],
                    help="leading blocks always selected, left out of the loss "
                         f"(default {d['sink_blocks']})")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def distill_main(argv: Sequence[str]) -> int:
    args = distill_parser().parse_args(list(argv))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tensors, meta = distill(args.model, lengths=args.lengths, windows=args.windows,
                                positions=args.positions, steps=args.steps, lr=args.lr,
                                device=device, seed=args.seed, block_size=args.block_size,
                                sink_blocks=args.sink_blocks, progress=not args.quiet)
    except ValueError as exc:
        print(f"vllm-dash distill: error: {exc}", file=sys.stderr)
        return 2
    write_summary_file(args.out, tensors, meta)
    h = json.loads(meta["held_out"])
    print(f"vllm-dash distill: wrote {args.out} (pool {list(tensors['pool'].shape)}) in "
          f"{meta['wall_s']} s; {h['on']} loss: mean pooling {h['mean']:.4f} "
          f"(t=1: {h['mean_t1']:.4f}), fitted {h['attn_pool']:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(distill_main(sys.argv[1:]))
