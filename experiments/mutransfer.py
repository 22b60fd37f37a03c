"""
Experiment 1 — µTransfer (Yang et al. 2022): sweep the base LR over powers of two at several widths under SP and µP and
watch where the best LR lands; plus the coordinate check (coord.py) under both.

    python experiments/mutransfer.py [--quick]

Claim (Yang et al. 2022; BTLM §3.2): under µP the best LR stays put as width grows, under SP it drifts down;
under µP activations are flat in width after updates, under SP they grow.
"""
import json
import math
import os
import subprocess
import sys
import time

from common import ROOT, RESULTS, plt, quick, read_run, save_json, savefig, train_run, train

WIDTHS = [32, 64, 128] if quick() else [32, 64, 128, 256]
LOG2_LRS = [-9, -7, -5] if quick() else list(range(-10, -3))   # η = 2^k
STEPS = 10 if quick() else 50
PARAMS = ["sp", "mup"]
SEEDS = [0] if quick() else [0, 1]   # init and data order; the best LR is taken on the mean over seeds

t0 = time.time()
# coordinate check: 10 steps at lr 1e-2 on a fixed batch (the coordinate check of Yang et al. 2022, §D.1)
coord = {}
os.makedirs(RESULTS, exist_ok=True)   # mup.py writes the plot but does not create its folder
for p in PARAMS:
    png = f"{RESULTS}/mutransfer_coord_{p}.png"
    out = subprocess.run([sys.executable, "coord.py", f"--param={p}", f"--widths={','.join(map(str, WIDTHS))}",
                          "--steps=10", "--lr=1e-2", f"--plot={png}", "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    coord[p] = json.loads(out.stdout)
    print(f"coord {p}: slopes at last step " + ", ".join(f"{k} {v:+.2f}" for k, v in coord[p]["final_slopes"].items()))

# LR sweep: 2-layer models, width d, µP base width 32, same data order and init seed for every run
per_seed = {p: {w: {k: [] for k in LOG2_LRS} for w in WIDTHS} for p in PARAMS}
N = {}
for seed in SEEDS:
    for p in PARAMS:
        for w in WIDTHS:
            for k in LOG2_LRS:
                name = f"mutransfer/{p}_w{w}_lr2e{k}" + (f"_s{seed}" if seed else "")
                try:
                    run = train_run(name, n_layer=2, n_head=4, n_embd=w, param=p, d_base=32, lr=2.0 ** k,
                                    max_iters=STEPS, batch_tokens=1024, seq_len_schedule=128, weight_decay=0.0,
                                    warmup=0.1, eval_interval=10_000, eval_batches=8, log_interval=5, seed=seed)
                    cfg, lines, evals = read_run(run)
                    per_seed[p][w][k].append(evals[-1]["val"]["prose"])
                    N[w] = cfg["N"]
                except train.TrainError as e:   # a diverged run (non-finite loss) counts as infinitely bad
                    print(f"  {name}: {e}")
                    per_seed[p][w][k].append(math.inf)
loss = {p: {w: {k: sum(v) / len(v) for k, v in per_seed[p][w].items()} for w in WIDTHS} for p in PARAMS}
best_seed = {p: {w: [min(LOG2_LRS, key=lambda k: per_seed[p][w][k][i]) for i in range(len(SEEDS))] for w in WIDTHS}
             for p in PARAMS}

best = {p: {w: min(loss[p][w], key=loss[p][w].get) for w in WIDTHS} for p in PARAMS}
# shift of the best LR from the narrowest to the widest model, in powers of two
shift = {p: best[p][WIDTHS[-1]] - best[p][WIDTHS[0]] for p in PARAMS}
for p in PARAMS:
    print(f"{p}: best log2(lr) by width {best[p]}  shift {shift[p]:+d}  per seed {best_seed[p]}")

fig, axes = plt().subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, p in zip(axes, PARAMS):
    for w in WIDTHS:
        ks = sorted(loss[p][w])
        ys = [min(loss[p][w][k], 10.0) for k in ks]
        ax.plot(ks, ys, marker="o", label=f"d={w} (N={N.get(w, 0):,})")
        ax.plot([best[p][w]], [loss[p][w][best[p][w]]], "k*", ms=10)
    ax.set_title(f"{p}: best log2 LR shift {shift[p]:+d} over widths {WIDTHS[0]}→{WIDTHS[-1]}")
    ax.set_xlabel("log2 base LR η")
    ax.legend(fontsize=8)
axes[0].set_ylabel(f"val loss (prose) after {STEPS} steps, mean of {len(SEEDS)} seeds")
savefig(fig, "mutransfer_lr")
save_json("mutransfer", {"widths": WIDTHS, "log2_lrs": LOG2_LRS, "steps": STEPS, "batch_tokens": 1024,
                         "n_layer": 2, "N": N, "val_loss": {p: {str(w): {str(k): v for k, v in loss[p][w].items()}
                                                                 for w in WIDTHS} for p in PARAMS},
                         "seeds": SEEDS,
                         "val_loss_per_seed": {p: {str(w): {str(k): v for k, v in per_seed[p][w].items()}
                                                   for w in WIDTHS} for p in PARAMS},
                         "best_log2_lr": best, "best_log2_lr_per_seed": best_seed, "shift_log2": shift,
                         "coord_final_slopes": {p: coord[p]["final_slopes"] for p in PARAMS},
                         "coord_max_slopes": {p: coord[p]["slopes"] for p in PARAMS},
                         "wall_s": time.time() - t0})
print(f"done in {time.time() - t0:.0f}s")
