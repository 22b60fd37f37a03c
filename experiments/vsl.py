"""
Experiment 2 — variable sequence length (BTLM §3.1, §4.4; issue 14 §1). The claim: an ALiBi model trained only at
the short length does not *use* context beyond it, while one that spends the last 25% of its tokens at the long
length does, so its loss at positions between the short and the long length is lower. Each domain: `short` (all
tokens at the short length) vs `vsl` (short for 75% of tokens, then long), the same tokens and one LR schedule,
≥ 2 seeds; then cross-entropy by position on fixed validation windows of 2× the long length.

v3 (the default; BTLM's 2,048 → 8,192 regime scaled 4×, not 16×): 512 → 2,048 on `synth_copy_far`, a SYNTHETIC
domain built into data.py (random symbols in which 16–32-symbol spans reappear 32–48 back, inside the short window,
or 600–2,000 back, beyond it: 2.3–7.8 logits of ALiBi penalty on the flattest head, slope 2^-8, as BTLM's 2k → 8k is
8–32). Batch 2,048 tokens (4 × 512, then 1 × 2,048), 8.2M tokens per run (after the base model), seeds 0, 1, 2,
evaluated on windows of 4,096. A seed's short and vsl runs share their first 75% (the batches are a function of
(seed, step), the model of its init and the batches): the vsl run is trained to the switch (step 3,000), its
checkpoint is copied into the short run's directory with seq_len_schedule set to 512, and both continue from there.
Both start from a model that already copies (a short-only synth_copy model of the same seed, 12M tokens at 128):
from scratch, 512-token training learned no copying in 3,250 steps. v2 (REPORT §2) was the same with half the
tokens (4.1M, switch at 1,500) from v1's 8M-token bases.

v1 (`--v1`, the first attempt, REPORT §2): 128 → 512 on `synth_copy` (far copies 128–512 back) and on real Python
code (`stdlib`), batch 1,024, windows of 1,024.

    python experiments/vsl.py [--quick] [--v1] [--shared_base | --farther]

--shared_base: v3 on synth_copy_far with seed 0's base copier for every seed (results/vsl_shared_base.json,
results/vsl_by_position_shared_base.csv): seeds then differ only by the comparison's batches. --farther: the same on
synth_copy_far2, far copies from 1,400-2,000 back only (results/vsl_farther.json, vsl_by_position_farther.csv).

v3 also runs the two schedules from scratch on real Python code (`stdlib`, 2 seeds). It writes results/vsl.json,
results/vsl_by_position.csv (synth_copy_far: schedule, seed, position, loss, short_len, long_len),
results/vsl_by_position_stdlib_512.csv (the same plus domain) and results/vsl_loss_by_position.png; v1
results/vsl_v1.json, results/vsl_by_position_v1.csv (synth_copy), results/vsl_by_position_stdlib.csv (the same
columns plus domain) and results/vsl_v1_loss_by_position.png.
Resumable: finished runs are reused, and each run's per-position losses are cached in its run directory.
"""
import contextlib
import csv
import json
import os
import shutil
import sys
import time

from common import RESULTS, RUNS, finished, plt, quick, save_json, savefig, train_run, train  # noqa: I001 (sets sys.path)
import numpy as np
import torch
import torch.nn.functional as F

import data as data_mod
from model import GPT, GPTConfig

V1 = "--v1" in sys.argv[1:]
# --shared_base: v3 with one base copier (seed 0's) for every seed, so that seeds differ only by the batches of the
# comparison itself, not by how well their bases copy (v3's seed spread of each schedule's loss is the bases')
SHARED = "--shared_base" in sys.argv[1:]
# --farther: the shared-base design on synth_copy_far2, whose far copies come from 1,400-2,000 back only (5.5-8 logits
# of ALiBi penalty on the flattest head, nearer BTLM's >= 8 past its 2,048 window): is short-only's loss past its
# window then no better than at its end? (v3's short-only model still copies from 512-1,000 back.)
FARTHER = "--farther" in sys.argv[1:]
SHARED = SHARED or FARTHER
data_mod.SYNTHETIC["synth_copy_far2"] = lambda stats, **kw: data_mod.iter_synth_copy(stats, **{"far": (1400, 2000),
                                                                                            **kw})
if V1:
    SHORT, LONG, EVAL_T, PER_DOC, RUN_DIR, TAG = 128, 512, 1024, 16, "vsl", "_v1"
    # (domain, tokens per run, seeds, evaluation windows). synth_copy needs ≈ 2-3M tokens before copying appears
    # at all (induction heads); its evaluation windows come from 12 fresh documents (seed 1, never trained on), 16
    # non-overlapping windows each; stdlib's from its val split.
    DOMAINS = [("synth_copy", 300_000 if quick() else 8_000_000, [0] if quick() else [0, 1, 2], 16 if quick() else 192),
               ("stdlib", 200_000 if quick() else 3_000_000, [0] if quick() else [0, 1], 16 if quick() else 48)]
    BATCH = 1024
else:
    SHORT, LONG, EVAL_T, PER_DOC, RUN_DIR, TAG = 512, 2048, 4096, 4, "vsl3", ""
    # Both schedules start from a model that already copies: a short-only synth_copy model of the same seed (12M
    # tokens at 128, batch 1,024; v2 used v1's 8M-token runs, and its seed 2 had formed one copying head, not two).
    # From scratch, 512-token training learned no copying: val 4.80-4.82 (uniform: 4.852) after 3,250 steps of
    # 2,048 tokens, in two attempts. 4,000 steps of 2,048 tokens (8.2M; v2: 2,000), the switch to 2,048 exactly at
    # step 3,000; 32 windows of 4,096 from 8 fresh documents (seed 1), 4 per document.
    # real text beside it: Python code, the same schedules from scratch (no base model), 2 seeds, 12 windows
    DOMAINS = [("synth_copy_far", 2048 * 100 if quick() else 2048 * 4000, [0] if quick() else [0, 1, 2],
                4 if quick() else 32)] + ([] if quick() else [("stdlib", 2048 * 4000, [0, 1], 12)])
    BATCH = 2048
    BASE = ("synth_copy", 200_000 if quick() else 12_000_000, 1024)  # the base copier: data, tokens, batch
    BASE_DIR = RUN_DIR
    if SHARED:
        RUN_DIR, TAG, DOMAINS = "vsl3_shared", "_shared_base", DOMAINS[:1]
    if FARTHER:
        RUN_DIR, TAG, DOMAINS = "vsl3_farther", "_farther", [("synth_copy_far2",) + DOMAINS[0][1:]]
SCHEDULES = {"short": f"{SHORT}", "vsl": f"{SHORT}:0.75,{LONG}:0.25"}
MODEL = dict(n_layer=2, n_head=4, n_embd=64, param="mup", d_base=64, lr=1.2e-2, batch_tokens=BATCH,
             schedule="linear", warmup=0.02, eval_batches=8, log_interval=100)
BUCKETS = [0, SHORT // 4, SHORT // 2, SHORT * 3 // 4, SHORT, 2 * SHORT, 3 * SHORT, LONG, LONG * 3 // 2, 2 * LONG]
FAR = (SHORT, LONG)          # the positions where the claim is tested
END = (SHORT * 3 // 4, SHORT)  # the last quarter of the short window
THIRD = (LONG - SHORT) // 3
SEEDS_ARG = [a for a in sys.argv[1:] if a.startswith("--seeds=")]  # e.g. --seeds=0,1: a subset, to commit as we go
if SEEDS_ARG:
    DOMAINS = [(d, t, [int(x) for x in SEEDS_ARG[0].split("=")[1].split(",")], n) for d, t, _, n in DOMAINS]

t0 = time.time()


def ensure_domain(name):
    path = os.path.join("data", name)
    if not os.path.exists(os.path.join(path, "meta.json")):
        data_mod.prepare(name, path)  # the built-ins and the synthetic domain alike
    return data_mod.Dataset(path)


def eval_windows(domain, n):
    """n windows of EVAL_T + 1 tokens: a synthetic domain's from fresh documents (seed 1; training used seed 0),
    PER_DOC per document; real text's evenly spread over the val split."""
    if domain in data_mod.SYNTHETIC:
        per_doc = PER_DOC
        docs = data_mod.SYNTHETIC[domain](None, n_docs=-(-n // per_doc), n_chars=per_doc * (EVAL_T + 1), seed=1)
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
    b = max(1, 8192 // EVAL_T)
    for i in range(0, len(x), b):
        logits, _ = model(x[i:i + b], y[i:i + b])
        out.append(F.cross_entropy(logits.float().transpose(1, 2), y[i:i + b], reduction="none"))
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
def source_attention(run_dir, rows, dist, n=48 if V1 else 8):
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
    b = max(1, 4096 // EVAL_T)
    for i in range(0, min(n, len(rows)), b):
        model(torch.from_numpy(rows[i:i + b, :-1]))
        B, T, C = got["qkv"].shape
        q, k, _ = (z.view(B, T, attn.n_head, -1).transpose(1, 2) for z in got["qkv"].split(C // 3, dim=2))
        att = (q @ k.transpose(-2, -1)) * attn.scale - attn.slopes[:, None, None] * (t[:, None] - t[None, :])
        att = att.masked_fill(t[None, :] > t[:, None], float("-inf")).softmax(-1)      # (B, H, T, T)
        d = torch.from_numpy(np.minimum(dist[i:i + b], EVAL_T))
        src = (t[None, :] + 1 - d).clamp(min=0)                                        # (B, T)
        w = att.gather(-1, src[:, None, :, None].expand(B, attn.n_head, T, 1))[..., 0]    # (B, H, T)
        for kind, m in (("near", d < SHORT), ("far only", (d >= SHORT) & (d < LONG))):
            sel = (m & inside[None]).float()
            sums[kind] = sums[kind] + (w * sel[:, None]).sum((0, 2))
            counts[kind] += float(sel.sum())
    hook.remove()
    return {kind: [round(float(v), 3) for v in sums[kind] / max(counts[kind], 1)] for kind in sums}


def _quiet_main(argv, name):
    t = time.time()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        train.main(argv)
    print(f"  trained {name} to step {int(train.load_checkpoint(os.path.join(RUNS, name))['step']):,} "
          f"in {time.time() - t:.0f}s", flush=True)


def ckpt_step(run_dir):
    cks = train.checkpoints(run_dir)
    return int(os.path.basename(cks[-1])[5:12]) if cks else -1


def train_pair(domain, tokens, seed):
    """v2: a seed's short and vsl runs share their first 75% of steps (same init, same batches: Batches draws
    step k's windows from (seed, k)). Train the vsl run to the switch, copy that checkpoint into the short run
    with seq_len_schedule = SHORT, then finish both. Returns {schedule: run dir}."""
    names = {n: f"{RUN_DIR}/{domain}_{n}_s{seed}" for n in SCHEDULES}
    dirs = {n: os.path.join(RUNS, v) for n, v in names.items()}
    steps = tokens // BATCH
    switch = steps * 3 // 4
    assert tokens % BATCH == 0 and steps % 4 == 0, "the switch must fall on a step boundary"
    base_data, base_tokens, base_batch = BASE
    ensure_domain(base_data)
    base = None   # real text starts from scratch; the synthetic domain from a copier (see above)
    if domain in data_mod.SYNTHETIC:
        base_seed = 0 if SHARED else seed
        base = train_run(f"{BASE_DIR}/base_{base_data}_s{base_seed}", data=base_data, tokens=base_tokens,
                         seq_len_schedule="128", seed=base_seed, eval_interval=max(1, base_tokens // base_batch // 8),
                         **{**MODEL, "batch_tokens": base_batch})
    flags = dict(data=domain, tokens=tokens, seq_len_schedule=SCHEDULES["vsl"], seed=seed,
                 eval_interval=max(1, steps // 8), sample_tokens=0, **MODEL, **({"init_from": base} if base else {}))
    if not finished(dirs["short"]) and not train.checkpoints(dirs["short"]):
        v = dirs["vsl"]
        if ckpt_step(v) < 0:
            _quiet_main([f"--out_dir={v}"] + [f"--{k}={x}" for k, x in flags.items()] + [f"--stop_at={switch}"],
                        names["vsl"])
        elif ckpt_step(v) < switch:
            _quiet_main([f"--out_dir={v}", "--init_from=resume", f"--stop_at={switch}"], names["vsl"])
        src = os.path.join(v, f"ckpt_{switch:07d}.pt")
        assert os.path.exists(src), f"{src} is missing: the shared prefix cannot be copied"
        tmp = dirs["short"] + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        ck = torch.load(src, map_location="cpu", weights_only=False)
        ck["config"].update(seq_len_schedule=SCHEDULES["short"], stop_at=0)
        torch.save(ck, os.path.join(tmp, os.path.basename(src)))
        lines = [l for l in open(os.path.join(v, "log.jsonl")) if l.strip() and json.loads(l)["step"] <= switch]
        open(os.path.join(tmp, "log.jsonl"), "w").writelines(lines)
        shutil.copy(os.path.join(v, "config.json"), os.path.join(tmp, "config.json"))  # rewritten on resume
        os.replace(tmp, dirs["short"])
    for n in ("short", "vsl"):
        if not finished(dirs[n]):
            _quiet_main([f"--out_dir={dirs[n]}", "--init_from=resume", "--stop_at=0"], names[n])
    return dirs


def mean(c, span):
    return float(c[span[0]:span[1]].mean())


results, curves = {}, {}
for domain, tokens, seeds, n_windows in DOMAINS:
    ensure_domain(domain)
    rows = eval_windows(domain, n_windows)
    losses = {}
    for seed in seeds:
        if V1:
            dirs = {name: train_run(f"{RUN_DIR}/{domain}_{name}_s{seed}", data=domain, tokens=tokens,
                                    seq_len_schedule=sched, seed=seed,
                                    eval_interval=max(1, tokens // MODEL["batch_tokens"] // 8), **MODEL)
                    for name, sched in SCHEDULES.items()}
        else:
            dirs = train_pair(domain, tokens, seed)
        for name in SCHEDULES:
            run = dirs[name]
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
        f"vsl_loss_{'_'.join(str(SHORT + i * THIRD) for i in range(4))}": [
            [round(mean(c["vsl", s], (a, a + THIRD)), 4) for a in range(SHORT, LONG, THIRD)] for s in seeds],
        f"short_loss_{'_'.join(str(SHORT + i * THIRD) for i in range(4))}": [
            [round(mean(c["short", s], (a, a + THIRD)), 4) for a in range(SHORT, LONG, THIRD)] for s in seeds],
    }
    if domain in data_mod.SYNTHETIC:  # loss by where the target can be copied from: the mechanism behind the curves
        dist = copy_distance(rows)
        pos = np.broadcast_to(np.arange(EVAL_T), dist.shape)
        kinds = {f"near (<{SHORT} back)": dist < SHORT,
                 f"far only ({SHORT}-{LONG - 1} back)": (dist >= SHORT) & (dist < LONG),
                 f"none within {LONG - 1} back": dist >= LONG}
        spans = {f"{END[0]}-{END[1]}": (pos >= END[0]) & (pos < END[1]),  # the end of the short window
                 f"{SHORT}-{LONG}": (pos >= SHORT) & (pos < LONG), f"{LONG}-{EVAL_T}": pos >= LONG}
        results[domain]["share_of_targets"] = {f"{k} @ {s}": round(float(m[sel].mean()), 4)
                                               for k, m in kinds.items() for s, sel in spans.items()}
        results[domain]["loss_by_copy_distance"] = {
            f"{n}_s{s}": {f"{k} @ {sp}": round(float(L[m & sel].mean()), 4) for k, m in kinds.items()
                          for sp, sel in spans.items() if (m & sel).any()} for (n, s), L in losses.items()}
        # how far back each schedule copies from: targets at positions SHORT..LONG-1 whose nearest source is d back,
        # d in 4 log-spaced bands past the short window (the flattest ALiBi head pays 2^-8·d logits there)
        edges = np.geomspace(SHORT, LONG, 5).round().astype(int)
        inside = (pos >= SHORT) & (pos < LONG)
        results[domain]["far_only_loss_by_source_distance"] = {
            f"{n}_s{s}": {f"{a}-{b - 1}": round(float(L[inside & (dist >= a) & (dist < b)].mean()), 4)
                          for a, b in zip(edges, edges[1:])} for (n, s), L in losses.items()}
        results[domain]["last_layer_attention_on_copy_source_per_head"] = {
            f"{n}_s{s}": source_attention(os.path.join(RUNS, f"{RUN_DIR}/{domain}_{n}_s{s}"), rows, dist)
            for n, s in losses}
    print(domain, json.dumps({k: results[domain][k] for k in ("far_loss", "vsl_gain_per_seed", "seed_spread",
                                                               "gain_over_3_spread", "gain_spread_paired",
                                                               "gain_over_3_paired_spread", "short_end_of_window_loss",
                                                               "short_far_no_better_than_end")}), flush=True)

# per-position CSVs: v2's synthetic domain in the file the issue names; v1's and real text beside it
os.makedirs(RESULTS, exist_ok=True)
for domain, path, with_domain in ([("synth_copy", "vsl_by_position_v1.csv", False),
                                   ("stdlib", "vsl_by_position_stdlib.csv", True)] if V1 else
                                  [(DOMAINS[0][0], f"vsl_by_position{TAG}.csv", False),
                                   ("stdlib", "vsl_by_position_stdlib_512.csv", True)]):
    if domain not in curves:
        continue
    with open(os.path.join(RESULTS, path), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow((["domain"] if with_domain else []) + ["schedule", "seed", "position", "loss", "short_len",
                                                          "long_len"])
        for (name, seed), c in curves[domain].items():
            for p, v in enumerate(c):
                w.writerow(([domain] if with_domain else []) + [name, seed, p, f"{v:.5f}", SHORT, LONG])

fig, axes = plt().subplots(len(DOMAINS), 2, figsize=(13, 4 * len(DOMAINS)), squeeze=False)
k = 16 if V1 else 64                                 # a running mean for readability (v2: 32 windows only)
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
    ax.set_title(f"{domain}{' (SYNTHETIC)' if domain in data_mod.SYNTHETIC else ''}: {tokens / 1e6:g}M tokens per run")
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
savefig(fig, f"vsl{TAG}_loss_by_position")
save_json(f"vsl{TAG}", {"schedules": SCHEDULES, "short_len": SHORT, "long_len": LONG, "eval_T": EVAL_T,
                  "model": MODEL, "domains": results,
                  # this invocation only: a rerun over finished runs and cached losses takes seconds
                  "wall_s_this_invocation": round(time.time() - t0)})
print(f"done in {time.time() - t0:.0f}s")
