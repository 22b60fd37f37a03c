"""
Experiment 2 — variable sequence length (SPEC §3): train one model on short sequences only and one on
short-then-long (75% of tokens at 128, the last 25% at 512; BTLM: 2,048 then 8,192) at the same token budget,
then measure loss by position on validation windows of twice the longest trained length (1,024 tokens).
Two model sizes, because a model too small to use long context has nothing to gain from the long stage.

    python experiments/vsl.py [--quick]

Claim (BTLM §3.1, §4.4): a model trained at short context only extrapolates poorly past it with ALiBi;
VSL training (the last 25% at 4× the length) fixes that at no extra tokens.
"""
import json
import time

from common import plt, quick, save_json, savefig, train_run, train  # noqa: I001 (sets sys.path)
import numpy as np
import torch
import torch.nn.functional as F

import data as data_mod
from model import GPT, GPTConfig

TOKENS = 200_000 if quick() else 1_500_000
EVAL_T, N_WINDOWS = 1024, 16 if quick() else 48
DATASET = "stdlib"   # code: long-range structure, and 11M tokens so no epoch repeats
MODELS = [(2, 64)] if quick() else [(2, 64), (4, 128)]    # (n_layer, n_embd): N = 100,008 and 793,512
RUNS = {"short_only": "128", "short_then_long": "128:0.75,512:0.25"}
BUCKETS = [0, 64, 128, 256, 384, 512, 768, 1024]

t0 = time.time()
ds = data_mod.Dataset(f"data/{DATASET}")
# per-position cross-entropy on fixed val windows of EVAL_T tokens (non-overlapping, evenly spread)
rows = ds.sample("val", EVAL_T, np.linspace(0, 1, N_WINDOWS, endpoint=False))
x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])


@torch.no_grad()
def per_position_loss(run_dir):
    ck = train.load_checkpoint(run_dir)
    model = GPT(GPTConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    model.eval()
    out = []
    for i in range(0, len(x), 8):
        logits, _ = model(x[i:i + 8], y[i:i + 8])
        out.append(F.cross_entropy(logits.float().transpose(1, 2), y[i:i + 8], reduction="none"))  # (b, T)
    return torch.cat(out).mean(0).numpy()          # mean over windows, per position


results = {}
fig, axes = plt().subplots(len(MODELS), 2, figsize=(12, 4 * len(MODELS)), squeeze=False)
for (L, d), (ax, ax2) in zip(MODELS, axes):
    tag = f"L{L}_d{d}"
    common = dict(n_layer=L, n_head=4, n_embd=d, param="mup", d_base=d, lr=1.2e-2, tokens=TOKENS,
                  batch_tokens=4096, data=DATASET, schedule="linear", warmup=0.02, eval_interval=10_000,
                  eval_batches=4, log_interval=10, seed=0)
    dirs = {name: train_run(f"vsl/{tag}_{name}", seq_len_schedule=s, **common) for name, s in RUNS.items()}
    curves = {name: per_position_loss(dd) for name, dd in dirs.items()}
    buckets = {name: {f"{a}-{b}": float(c[a:b].mean()) for a, b in zip(BUCKETS[:-1], BUCKETS[1:])}
               for name, c in curves.items()}
    for name in RUNS:
        print(tag, name, " ".join(f"{k}:{v:.3f}" for k, v in buckets[name].items()))
    results[tag] = {"N": json.load(open(f"{dirs['short_only']}/config.json"))["N"], "bucket_loss": buckets,
                    "per_position_loss": {k: [round(float(v), 4) for v in c] for k, c in curves.items()}}
    k = 16                                          # a 16-position running mean for readability
    for name, c in curves.items():
        ax.plot(np.arange(len(c) - k + 1) + k // 2, np.convolve(c, np.ones(k) / k, mode="valid"),
                label=f"{name} ({RUNS[name]})")
    for v in (128, 512):
        ax.axvline(v, color="gray", ls=":", lw=1)
    ax.set_xlabel("position in a 1,024-token window")
    ax.set_ylabel("val cross-entropy (nats/byte)")
    ax.set_title(f"{tag} (N={results[tag]['N']:,}): loss by position, {TOKENS / 1e6:.1f}M tokens each")
    ax.legend()
    names = list(RUNS)
    diff = curves[names[1]] - curves[names[0]]
    mids = [(a + b) / 2 for a, b in zip(BUCKETS[:-1], BUCKETS[1:])]
    ax2.bar(mids, [diff[a:b].mean() for a, b in zip(BUCKETS[:-1], BUCKETS[1:])], width=np.diff(BUCKETS) * 0.9)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("position bucket")
    ax2.set_ylabel(f"loss({names[1]}) − loss({names[0]})")
    ax2.set_title("negative = VSL better")
savefig(fig, "vsl_loss_by_position")
save_json("vsl", {"tokens": TOKENS, "dataset": DATASET, "eval_T": EVAL_T, "n_windows": N_WINDOWS, "runs": RUNS,
                  "models": results, "wall_s": time.time() - t0})
print(f"done in {time.time() - t0:.0f}s")
