"""
Experiment 2 — variable sequence length (BTLM §3.1, §4.4; issue 14 §1). The claim: an ALiBi model trained only at
the short length does not *use* context beyond it, while one that spends the last 25% of its tokens at the long
length does, so its loss at positions between the short and the long length is lower (BTLM: 2,048 → 8,192; here
128 → 512). Each domain: `short` (all tokens at 128) vs `vsl` (128 for 75% of tokens, then 512), the same tokens
and one LR schedule, ≥ 2 seeds; then cross-entropy by position on fixed validation windows of 1,024 tokens.

Two domains: `synth_copy`, a SYNTHETIC long-range domain built into data.py (random symbols in which 16–32-symbol
spans reappear 32–48 or 128–512 symbols later, so a model that can reach back t tokens keeps gaining up to t = 512),
and real Python code (`stdlib`).

    python experiments/vsl.py [--quick]

Writes results/vsl.json, results/vsl_by_position.csv (synth_copy: schedule, seed, position, loss, short_len,
long_len), results/vsl_by_position_stdlib.csv (the same columns plus domain) and results/vsl_loss_by_position.png.
Resumable: finished runs are reused, and each run's per-position losses are cached in its run directory.
"""
import csv
import json
import os
import time

from common import RESULTS, RUNS, plt, quick, save_json, savefig, train_run, train  # noqa: I001 (sets sys.path)
import numpy as np
import torch
import torch.nn.functional as F

import data as data_mod
from model import GPT, GPTConfig

SHORT, LONG = 128, 512
SCHEDULES = {"short": f"{SHORT}", "vsl": f"{SHORT}:0.75,{LONG}:0.25"}
EVAL_T = 1024
# (domain, tokens per run, seeds, evaluation windows). synth_copy needs ≈ 2-3M tokens before copying appears at
# all (induction heads); its evaluation windows come from 12 fresh documents (seed 1, never trained on), 16
# non-overlapping windows each; stdlib's from its val split.
DOMAINS = [("synth_copy", 300_000 if quick() else 8_000_000, [0] if quick() else [0, 1, 2], 16 if quick() else 192),
           ("stdlib", 200_000 if quick() else 3_000_000, [0] if quick() else [0, 1], 16 if quick() else 48)]
MODEL = dict(n_layer=2, n_head=4, n_embd=64, param="mup", d_base=64, lr=1.2e-2, batch_tokens=1024,
             schedule="linear", warmup=0.02, eval_batches=8, log_interval=100)
BUCKETS = [0, 32, 64, 96, 128, 256, 384, 512, 768, 1024]
FAR = (SHORT, LONG)          # the positions where the claim is tested
END = (SHORT * 3 // 4, SHORT)  # the last quarter of the short window

t0 = time.time()


def ensure_domain(name):
    path = os.path.join("data", name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        data_mod.prepare(name, path)  # the built-ins and the synthetic domain alike
    return data_mod.Dataset(path)


def eval_windows(domain, n):
    """n windows of EVAL_T + 1 tokens: synth_copy's from fresh documents (seed 1; training used seed 0), 16 per
    document; real text's evenly spread over the val split."""
    if domain == "synth_copy":
        per_doc = 16
        docs = data_mod.iter_synth_copy(None, n_docs=-(-n // per_doc), n_chars=per_doc * (EVAL_T + 1), seed=1)
        toks = np.concatenate([np.frombuffer(d.encode("ascii"), np.uint8).astype(np.int64) for d in docs])
        return toks[:n * (EVAL_T + 1)].reshape(n, EVAL_T + 1)
    return ensure_domain(domain).sample("val", EVAL_T, np.linspace(0, 1, n, endpoint=False))


@torch.no_grad()
def per_token_loss(run_dir, rows):
    """Cross-entropy of every next-token prediction in the windows rows, (n, EVAL_T); cached in the run directory."""
    cache = os.path.join(run_dir, f"per_token_T{EVAL_T}_n{len(rows)}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    ck = train.load_checkpoint(run_dir)
    model = GPT(GPTConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    model.eval()
    out = []
    for i in range(0, len(x), 8):
        logits, _ = model(x[i:i + 8], y[i:i + 8])
        out.append(F.cross_entropy(logits.float().transpose(1, 2), y[i:i + 8], reduction="none"))
    c = torch.cat(out).numpy()
    np.save(cache, c)
    return c


def copy_distance(rows):
    """For every target token rows[:, t + 1]: the distance back to the nearest earlier occurrence, inside the
    window, of the 3 tokens ending at it (a copy's source), or a large number if there is none."""
    near = np.full(rows.shape, 10 ** 9)
    for d in range(1, EVAL_T - 1):
        m = np.zeros(rows.shape, bool)
        m[:, d + 2:] = ((rows[:, d + 2:] == rows[:, 2:-d]) & (rows[:, d + 1:-1] == rows[:, 1:-d - 1])
                        & (rows[:, d:-2] == rows[:, :-d - 2]))
        near = np.where(m & (near > d), d, near)
    return near[:, 1:]


@torch.no_grad()
def source_attention(run_dir, rows, dist, n=48):
    """Mechanism: the last layer's attention, per head, on the key a target would be copied from (the earlier
    occurrence of the target symbol, t + 1 - δ for a target at query t with copy distance δ), averaged over the
    near (< SHORT back) and far-only (SHORT..LONG-1 back) targets at query positions SHORT..LONG-1, on the first
    n windows. The heads' ALiBi slopes are 2^-2, 2^-4, 2^-6, 2^-8 (4 heads)."""
    ck = train.load_checkpoint(run_dir)
    model = GPT(GPTConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    model.eval()
    attn = model.transformer.h[-1].attn
    got = {}
    hook = attn.c_attn.register_forward_hook(lambda mod, inp, out: got.__setitem__("qkv", out))
    t = torch.arange(EVAL_T)
    sums, counts = {"near": 0, "far only": 0}, {"near": 0, "far only": 0}
    inside = (t >= SHORT) & (t < LONG)
    for i in range(0, min(n, len(rows)), 4):
        model(torch.from_numpy(rows[i:i + 4, :-1]))
        B, T, C = got["qkv"].shape
        q, k, _ = (z.view(B, T, attn.n_head, -1).transpose(1, 2) for z in got["qkv"].split(C // 3, dim=2))
        att = (q @ k.transpose(-2, -1)) * attn.scale - attn.slopes[:, None, None] * (t[:, None] - t[None, :])
        att = att.masked_fill(t[None, :] > t[:, None], float("-inf")).softmax(-1)      # (B, H, T, T)
        d = torch.from_numpy(np.minimum(dist[i:i + 4], EVAL_T))
        src = (t[None, :] + 1 - d).clamp(min=0)                                        # (B, T)
        w = att.gather(-1, src[:, None, :, None].expand(B, attn.n_head, T, 1))[..., 0]    # (B, H, T)
        for kind, m in (("near", d < SHORT), ("far only", (d >= SHORT) & (d < LONG))):
            sel = (m & inside[None]).float()
            sums[kind] = sums[kind] + (w * sel[:, None]).sum((0, 2))
            counts[kind] += float(sel.sum())
    hook.remove()
    return {kind: [round(float(v), 3) for v in sums[kind] / max(counts[kind], 1)] for kind in sums}


def mean(c, span):
    return float(c[span[0]:span[1]].mean())


results, curves = {}, {}
for domain, tokens, seeds, n_windows in DOMAINS:
    ensure_domain(domain)
    rows = eval_windows(domain, n_windows)
    losses = {}
    for seed in seeds:
        for name, sched in SCHEDULES.items():
            run = train_run(f"vsl/{domain}_{name}_s{seed}", data=domain, tokens=tokens, seq_len_schedule=sched,
                            seed=seed, eval_interval=max(1, tokens // MODEL["batch_tokens"] // 8), **MODEL)
            losses[name, seed] = per_token_loss(run, rows)
    c = curves[domain] = {k: v.mean(0) for k, v in losses.items()}
    far = {k: mean(v, FAR) for k, v in c.items()}
    gain = [far["short", s] - far["vsl", s] for s in seeds]           # > 0: VSL better at far positions
    spread = max(max(far[n, s] for s in seeds) - min(far[n, s] for s in seeds) for n in SCHEDULES)
    end_short = [mean(c["short", s], END) for s in seeds]
    far_short = [far["short", s] for s in seeds]
    results[domain] = {
        "tokens": tokens, "seeds": seeds, "eval_windows": n_windows,
        "N": json.load(open(os.path.join(run, "config.json")))["N"],
        "bucket_loss": {f"{n}_s{s}": {f"{a}-{b}": round(mean(v, (a, b)), 4) for a, b in zip(BUCKETS, BUCKETS[1:])}
                        for (n, s), v in c.items()},
        "far_range": list(FAR), "far_loss": {f"{n}_s{s}": round(v, 4) for (n, s), v in far.items()},
        "vsl_gain_per_seed": [round(g, 4) for g in gain], "vsl_gain_mean": round(float(np.mean(gain)), 4),
        # two readings of "seed-to-seed spread": of each schedule's far-range loss (unpaired: the larger of the two
        # schedules' max - min over seeds), and of the gain itself (paired: a seed's short and vsl runs share the
        # initialisation and every batch of the first 75% of training, so they differ only by the long stage)
        "seed_spread": round(spread, 4),
        "gain_over_3_spread": bool(min(gain) > 3 * spread) if len(seeds) > 1 else None,
        "gain_spread_paired": round(max(gain) - min(gain), 4),
        "gain_over_3_paired_spread": bool(min(gain) > 3 * (max(gain) - min(gain))) if len(seeds) > 1 else None,
        "short_end_of_window_loss": [round(v, 4) for v in end_short],
        "short_far_no_better_than_end": bool(all(f >= e for f, e in zip(far_short, end_short))),
        # the precondition: the long-trained model's loss keeps falling past the short length
        "vsl_loss_128_256_384_512": [[round(mean(c["vsl", s], (a, a + 128)), 4) for a in (128, 256, 384)]
                                     for s in seeds],
    }
    if domain == "synth_copy":  # loss by where the target can be copied from: the mechanism behind the curves
        dist = copy_distance(rows)
        pos = np.broadcast_to(np.arange(EVAL_T), dist.shape)
        kinds = {"near (<128 back)": dist < SHORT, "far only (128-511 back)": (dist >= SHORT) & (dist < LONG),
                 "none within 511 back": dist >= LONG}
        spans = {"128-512": (pos >= SHORT) & (pos < LONG), "512-1024": pos >= LONG}
        results[domain]["share_of_targets"] = {f"{k} @ {s}": round(float(m[sel].mean()), 4)
                                               for k, m in kinds.items() for s, sel in spans.items()}
        results[domain]["loss_by_copy_distance"] = {
            f"{n}_s{s}": {f"{k} @ {sp}": round(float(L[m & sel].mean()), 4) for k, m in kinds.items()
                          for sp, sel in spans.items()} for (n, s), L in losses.items()}
        results[domain]["last_layer_attention_on_copy_source_per_head"] = {
            f"{n}_s{s}": source_attention(os.path.join(RUNS, f"vsl/{domain}_{n}_s{s}"), rows, dist)
            for n, s in losses}
    print(domain, json.dumps({k: results[domain][k] for k in ("far_loss", "vsl_gain_per_seed", "seed_spread",
                                                               "gain_over_3_spread", "gain_spread_paired",
                                                               "gain_over_3_paired_spread", "short_end_of_window_loss",
                                                               "short_far_no_better_than_end")}), flush=True)

# per-position CSVs: the synthetic domain alone in the file the issue names, real text beside it (with a domain column)
os.makedirs(RESULTS, exist_ok=True)
for domain, path, with_domain in [("synth_copy", "vsl_by_position.csv", False),
                                  ("stdlib", "vsl_by_position_stdlib.csv", True)]:
    with open(os.path.join(RESULTS, path), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["domain"] if with_domain else []) + ["schedule", "seed", "position", "loss", "short_len",
                                                          "long_len"])
        for (name, seed), c in curves[domain].items():
            for p, v in enumerate(c):
                w.writerow(([domain] if with_domain else []) + [name, seed, p, f"{v:.5f}", SHORT, LONG])

fig, axes = plt().subplots(len(DOMAINS), 2, figsize=(13, 4 * len(DOMAINS)), squeeze=False)
k = 16                                               # a 16-position running mean for readability
for (domain, tokens, seeds, _), (ax, ax2) in zip(DOMAINS, axes):
    c = curves[domain]
    for (name, seed), v in c.items():
        ax.plot(np.arange(len(v) - k + 1) + k // 2, np.convolve(v, np.ones(k) / k, mode="valid"),
                color="C0" if name == "short" else "C1", ls=["-", "--", ":"][seed % 3], lw=1,
                label=f"{name} ({SCHEDULES[name]}) seed {seed}")
    for ax_ in (ax, ax2):
        for v in (SHORT, LONG):
            ax_.axvline(v, color="gray", ls=":", lw=1)
    ax.set_xlabel(f"position in a {EVAL_T:,}-token validation window")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{domain}{' (SYNTHETIC)' if domain == 'synth_copy' else ''}: {tokens / 1e6:g}M tokens per run")
    ax.legend(fontsize=8)
    for seed in seeds:
        d = c["vsl", seed] - c["short", seed]
        ax2.plot(np.arange(len(d) - k + 1) + k // 2, np.convolve(d, np.ones(k) / k, mode="valid"), lw=1,
                 label=f"seed {seed}")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xlabel("position")
    ax2.set_ylabel("loss(vsl) − loss(short)")
    ax2.set_title("negative = VSL better")
    ax2.legend(fontsize=8)
savefig(fig, "vsl_loss_by_position")
save_json("vsl", {"schedules": SCHEDULES, "short_len": SHORT, "long_len": LONG, "eval_T": EVAL_T,
                  "model": MODEL, "domains": results,
                  # this invocation only: a rerun over finished runs and cached losses takes seconds
                  "wall_s_this_invocation": round(time.time() - t0)})
print(f"done in {time.time() - t0:.0f}s")
