"""
Experiment 3 — loss-curve collapse of a family trained here (SPEC §6; Qiu et al. 2025, Bergsma et al. 2025):

  * the family: widths 16-64 at depth 2 (N + embedding 10.7k-116k, 10.9x), 3 seeds, TPP and τ = τ_opt(TPP) fixed,
    linear decay to zero, curves = validation loss on fixed windows evaluated ≈50 times per run
    (`common.recipe_flags`; seed 0 is experiment 4's grid run of the same name);
  * a control family: the same with one weight decay λ for every size (tuned at d = 32), so τ ∝ 1/D varies 11x;
  * Δ(x) against the seed floor σ(x) under L/L(1) (Bergsma) and (L − L0)/(L(1) − L0) with L0 fitted (Qiu);
  * forecasts of every run's final loss from its first 30%, the other sizes as reference; an LR sweep at one width
    ranked by those forecasts;
  * a subtle fault (from 50% the LR schedule runs at 2x speed, LR 0 from 75%: no spike) flagged by train.py's live monitor, and
    the same monitor on the healthy twins.

    python experiments/collapse_family.py [--quick]
    python collapse.py analyze --runs=experiments/results/collapse_family.csv --offset=fit   # re-run the analysis
"""
import math
import os
import sys
import time

import numpy as np

from common import (RESULTS, RUNS, plt, quick, read_run, recipe_flags, save_json, savefig, train_run,  # noqa: I001
                    val_curve, write_curves_csv)
import collapse as C
import mup

WIDTHS = [16, 24, 32] if quick() else [16, 24, 32, 48, 64]
SEEDS = [0, 1, 2]
TPP = 10.0 if quick() else 40.0    # near experiment 4's compute-optimal TPP
STEPS = 105 if quick() else 417   # every size takes ≈ this many steps (d16's count at a batch of 1,024): B ∝ D
LR = 2 ** -6
MID = WIDTHS[len(WIDTHS) // 2]          # control family: λ tuned here; fault and sweep at this width
SWEEP_LRS = [2 ** -8, 2 ** -7, 2 ** -5, 2 ** -4]   # plus LR (the family run itself)
FAULT_AT = 0.5                           # from here on the schedule runs at FAULT_SPEED × its rate
FAULT_SPEED = 2.0                        # LR reaches 0 at x = 0.75 and stays there
AT = 0.3                                 # forecasts from the first 30%
XS = (0.5, 0.95)                         # the supercollapse window


def name(kind, w, seed, **tag):
    extra = "".join(f"_{k}{v}" for k, v in tag.items())
    return f"{kind}/tpp{TPP:g}_T{STEPS}_w{w}_s{seed}{extra}"


def fast_decay(orig, at, speed=FAULT_SPEED):
    """The fault: from step at·T on, the schedule advances at `speed` × its rate, so with speed 2 the LR decays
    smoothly to 0 by x = 0.75 and the last quarter of the tokens is trained at LR 0 — a job restarted at 50% with
    the scheduler's step counted in micro-batches (2 per optimizer step after a change of world size or gradient
    accumulation). No spike anywhere: the raw loss even falls faster for a while."""
    def f(step, steps, *a, **k):
        s0 = at * steps
        s = np.where(np.asarray(step, float) >= s0, s0 + speed * (np.asarray(step, float) - s0), step)
        return orig(s if np.ndim(s) else float(s), steps, *a, **k)
    return f


def stats(curves, offset, window=1):
    """collapse.analyze plus the Δ/σ ratio over x in XS."""
    res = C.analyze(curves, offset=offset, window=window, force=True)
    grid, L, ell, delta, sigma = res.pop("arrays")
    sel = (grid >= XS[0]) & (grid <= XS[1])
    if sigma is not None:
        r = delta[sel] / sigma[sel]
        res.update(ratio_mean=float(r.mean()), ratio_max=float(r.max()), frac_below=float(np.mean(r <= 1)),
                   delta_mean=float(delta[sel].mean()), sigma_mean=float(sigma[sel].mean()))
    else:
        res.update(delta_mean=float(delta[sel].mean()))
    return res, (grid, L, ell, delta, sigma)


def forecast_L0(c, refs, at=AT, x_min=0.05):
    """Qiu-normalised forecast: L(x) − L0 = (L(1) − L0)·ℓ_ref(x) on the prefix, L0 fitted on the reference runs'
    sizes and final losses only (the forecast run's own end is never used)."""
    try:
        grid, _, ell, L0 = C.normalise(refs, "fit", 1)
    except C.CollapseError:   # fewer than 3 reference sizes (the --quick family): L0 = 0
        grid, _, ell, L0 = C.normalise(refs, "none", 1)
    ref = ell.mean(0)
    pre = (c.x <= at + 1e-12) & (c.x >= x_min)
    r = np.interp(c.x[pre], grid, ref)
    return float(L0 + np.exp(np.mean(np.log(c.loss[pre] - L0) - np.log(r)))), L0


t0 = time.time()
walls = {}


def timed(key, fn):
    t = time.time()
    out = fn()
    walls[key] = walls.get(key, 0.0) + time.time() - t
    return out


# ---- training (sequential, resumable): family, control, LR sweep, fault
FAM, CTL, SWEEP, FAULT = "collapse", "collapse_control", "collapse_sweep", "collapse_fault"
fam_dirs = [timed("family", lambda: train_run(name(FAM, w, s), **recipe_flags(w, s, TPP, lr=LR, steps=STEPS)))
            for s in SEEDS for w in WIDTHS]
# control: one λ for every size (the one giving τ_opt at MID), with µP's width-scaled decay (λ·m_N on the hidden
# matrices, as --tau applies it), so τ = B/(ηλD) ∝ 1/D: τ_opt·D_MID/D at each size, an 11x spread over the family
D_of = lambda w: recipe_flags(w, 0, TPP, steps=STEPS)["tokens"]
TAU_CTL = {w: mup.tau_opt(TPP) * D_of(MID) / D_of(w) for w in WIDTHS}
lam = read_run(os.path.join(RUNS, name(FAM, MID, 0)))[0]["weight_decay"]   # that λ (base, embedding group)
ctl_dirs = [timed("control", lambda: train_run(name(CTL, w, s), **recipe_flags(w, s, TPP, lr=LR, tau=TAU_CTL[w], steps=STEPS)))
            for s in SEEDS for w in WIDTHS]
sweep_dirs = {LR: os.path.join(RUNS, name(FAM, MID, 0))}
for lr in SWEEP_LRS:
    sweep_dirs[lr] = timed("sweep", lambda: train_run(name(SWEEP, MID, 0, lr=f"{math.log2(lr):g}"),
                                                     **recipe_flags(MID, 0, TPP, lr=lr, steps=STEPS)))
refs_dirs = [d for d, w in zip(fam_dirs, [w for s in SEEDS for w in WIDTHS]) if w != MID]
orig = mup.lr_factor
mup.lr_factor = fast_decay(orig, FAULT_AT)
try:
    fault_dir = timed("fault", lambda: train_run(name(FAULT, MID, 0, fastdecay=FAULT_AT), quiet=True,
                                                 **recipe_flags(MID, 0, TPP, lr=LR, steps=STEPS,
                                                                collapse_ref=",".join(refs_dirs))))
finally:
    mup.lr_factor = orig
print(f"trained in {time.time() - t0:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items()), flush=True)

# ---- curves and CSVs (the analysis below reads the CSVs, so `collapse.py analyze` sees exactly these numbers)
os.makedirs(RESULTS, exist_ok=True)
fam_csv = write_curves_csv([val_curve(d, TPP) for d in fam_dirs], os.path.join(RESULTS, "collapse_family.csv"))
ctl_csv = write_curves_csv([val_curve(d, TPP) for d in ctl_dirs], os.path.join(RESULTS, "collapse_control.csv"))
fam = C.load_curves(fam_csv)
ctl = C.load_curves(ctl_csv)
for c in fam + ctl:
    c.seed = int(float(c.seed))

out = {"widths": WIDTHS, "seeds": SEEDS, "tpp": TPP, "lr": LR, "tau": fam[0].tau, "control_lambda_at_mid": lam, "control_tau_by_width": TAU_CTL,
       "control_tau": {c.name: c.tau for c in ctl if c.seed == 0},
       "runs": {os.path.basename(d): {k: read_run(d)[0][k] for k in ("N", "D", "T", "B", "tau", "weight_decay")}
                for d in fam_dirs + ctl_dirs + list(sweep_dirs.values()) + [fault_dir]},
       "final_val": {c.name: float(c.loss[-1]) for c in fam + ctl}}

# ---- Δ vs σ: both normalisations, family and control; plus the training-loss curves of the same runs (old way)
table = {}
arrays = {}
for fam_name, cs in (("family", fam), ("control", ctl)):
    for off in ("none", "fit"):
        res, arr = stats(cs, off)
        table[f"{fam_name}_{off}"] = res
        arrays[f"{fam_name}_{off}"] = arr
        print(f"{fam_name:8s} offset={off:4s} L0={res['L0']:.3f}  Δ {np.round(res['delta'], 4)}  σ {np.round(res['sigma'], 4)}"
              f"  Δ/σ on [{XS[0]}, {XS[1]}]: mean {res['ratio_mean']:.2f} max {res['ratio_max']:.2f}", flush=True)
train_curves = [C.load_run(d) for d in fam_dirs]   # size = non-embedding N: only groups the seeds
for off in ("none", "fit"):
    res, _ = stats(train_curves, off, window=9)
    table[f"family_trainloss_{off}"] = res
    print(f"family, training loss (9-pt smoothing) offset={off}: Δ/σ mean {res['ratio_mean']:.2f} max {res['ratio_max']:.2f}")
# the same sizes with a fixed batch of 1,024 tokens (experiment 4's grid, seed 0: Δ without σ; T ∝ D), and the
# fixed-step recipe at TPP 10 (probe, seed 0)
grid_tpp = {}
for t, pat in [(t, "grid/tpp%g_w%d_s0") for t in (10.0, 20.0, 40.0, 80.0)] + [(10.0, "collapse_probe/fixT105_tpp%g_w%d_s0")]:
    ds = [f"{RUNS}/" + pat % (t, w) for w in WIDTHS]
    if all(os.path.exists(os.path.join(d, "config.json")) for d in ds) and not quick():
        try:
            cs = [val_curve(d, t) for d in ds]
            grid_tpp[pat % (t, 0)] = {off: stats(cs, off)[0]["delta_mean"] for off in ("none", "fit")}
        except C.CollapseError as e:
            grid_tpp[pat % (t, 0)] = str(e)
table["seed0_delta_by_tpp"] = grid_tpp
print("seed-0 Δ mean on [0.5, 0.95] by TPP:", grid_tpp)
out["collapse"] = table

# ---- forecasts from the first 30%: reference = the family runs of the other widths (all seeds)
fc = []
for c, kind in [(c, "family") for c in fam] + [(c, "control") for c in ctl]:
    refs = [r for r in fam if r.size != c.size]
    r_plain = C.forecast_runs([c], refs, at=AT, shape="curve", force=True)["ranking"][0]
    l0_hat, L0 = forecast_L0(c, refs)
    fc.append({"run": c.name, "family": kind, "L1": float(c.loss[-1]),
               "L1_hat_ratio": r_plain["L1_hat"], "err_ratio": r_plain["L1_hat"] / c.loss[-1] - 1,
               "L1_hat_L0": l0_hat, "err_L0": l0_hat / c.loss[-1] - 1, "L0_used": L0})
fsum = {}
for f in ("family", "control"):
    for k in ("err_ratio", "err_L0"):
        e = np.abs([r[k] for r in fc if r["family"] == f])
        fsum[f"{f}_{k}"] = {"mean_abs": float(e.mean()), "max_abs": float(e.max())}
        print(f"forecast at {AT:.0%}, {f}, {k}: mean |err| {100 * e.mean():.2f}%, max {100 * e.max():.2f}%")
out["forecasts"] = fc
out["forecast_summary"] = fsum

# ---- the LR sweep ranked by forecasts at 30%
sw = []
refs = [r for r in fam if r.size != fam[WIDTHS.index(MID)].size]
g_ref, _, ell_ref, _ = C.normalise(refs, "none", 1)
for lr, d in sorted(sweep_dirs.items()):
    c = val_curve(d, TPP)
    pre = c.x <= AT + 1e-12
    sw.append({"lr": lr, "log2_lr": math.log2(lr), "L1": float(c.loss[-1]), "L_at30": float(np.interp(AT, c.x, c.loss)),
               "L1_hat_ratio": C.forecast(c.x[pre], c.loss[pre], (g_ref, ell_ref.mean(0))),
               "L1_hat_L0": forecast_L0(c, refs)[0]})
best = lambda k: min(sw, key=lambda r: r[k])["log2_lr"]
out["sweep"] = {"width": MID, "runs": sw, "true_best": best("L1"), "picked_ratio": best("L1_hat_ratio"),
                "picked_L0": best("L1_hat_L0"), "picked_naive_at30": best("L_at30")}
print("LR sweep at d%d: true best 2^%g, forecast picks 2^%g (L/L(1)) and 2^%g (L0), lowest loss at 30%%: 2^%g" %
      (MID, out["sweep"]["true_best"], out["sweep"]["picked_ratio"], out["sweep"]["picked_L0"],
       out["sweep"]["picked_naive_at30"]))
for r in sw:
    print(f"   η=2^{r['log2_lr']:g}: final {r['L1']:.4f}, at 30% {r['L_at30']:.4f}, forecast {r['L1_hat_ratio']:.4f} / {r['L1_hat_L0']:.4f}")

# ---- the fault: the live monitor's alerts (train.py logs the smoothed residual), and the twins replayed
mon_refs = [C.load_run(d) for d in refs_dirs]


def monitor(d):
    cfg, lines, ev = read_run(d)
    m = C.CollapseMonitor(mon_refs)
    xs = np.array([l["tokens"] / cfg["D"] for l in lines])
    alerts = np.array([m.update(x, l["loss"])["alert"] for x, l in zip(xs, lines)])
    return {"x": xs, "loss": np.array([l["loss"] for l in lines]), "alerts": alerts, "mon": m,
            "first_alert": float(xs[np.argmax(alerts)]) if alerts.any() else None, "n_alerts": int(alerts.sum()),
            "final_val": ev[-1]["val"]["prose"], "logged_resid": np.array([l.get("collapse_residual", np.nan) for l in lines])}


twins = {s: monitor(os.path.join(RUNS, name(FAM, MID, s))) for s in SEEDS}
fault = monitor(fault_dir)
tw_final = np.array([t["final_val"] for t in twins.values()])
# how the raw loss looks: the fault run's training loss against its own twins at the first alert
xa = fault["first_alert"]
raw_gap = None
if xa is not None:
    k = int(np.argmax(fault["x"] >= xa))
    win = slice(max(0, k - 4), k + 1)
    raw_gap = {"fault_loss_5pt": float(fault["loss"][win].mean()),
               "twins_loss_5pt": [float(t["loss"][win].mean()) for t in twins.values()]}
out["fault"] = {"width": MID, "kind": f"LR schedule at {FAULT_SPEED:g}x speed from x = {FAULT_AT} (LR 0 from x = {FAULT_AT + (1 - FAULT_AT) / FAULT_SPEED:g})", "first_alert_x": xa,
                "n_alerts": fault["n_alerts"], "final_val": fault["final_val"], "twins_final_val": tw_final.tolist(),
                "final_val_excess": float(fault["final_val"] / tw_final.mean() - 1),
                "twins_seed_sd_rel": float(tw_final.std(ddof=1) / tw_final.mean()),
                "twins_false_alerts": {str(s): t["n_alerts"] for s, t in twins.items()}, "raw_at_alert": raw_gap,
                "max_step_jump_fault": float(np.max(np.abs(np.diff(fault["loss"])))),
                "max_step_jump_twins": float(max(np.max(np.abs(np.diff(t["loss"]))) for t in twins.values()))}
print(f"fault ({out['fault']['kind']}): first alert x = {xa}, {fault['n_alerts']} alerts, final val "
      f"{fault['final_val']:.4f} vs twins {np.round(tw_final, 4)} ({100 * out['fault']['final_val_excess']:+.2f}%); "
      f"twins' false alerts {out['fault']['twins_false_alerts']}")

# ---- plots
P = plt()
fig, axes = P.subplots(2, 3, figsize=(16, 8.5))
for row, (fn, cs) in enumerate((("family", fam), ("control", ctl))):
    grid, L, ell, delta, sigma = arrays[f"{fn}_fit"]
    _, _, ell_b, delta_b, sigma_b = arrays[f"{fn}_none"]
    for i, c in enumerate(cs):
        col = f"C{WIDTHS.index(int(c.name.split('_w')[1].split('_')[0]))}"
        axes[row, 0].plot(grid, L[i], color=col, lw=0.8, ls=["-", "--", ":"][c.seed % 3])
        axes[row, 1].plot(grid, ell[i], color=col, lw=0.8, ls=["-", "--", ":"][c.seed % 3])
    axes[row, 0].set_yscale("log")
    axes[row, 0].set_title(f"{fn}: validation loss, TPP {TPP:g}" + (", τ_opt" if fn == "family" else ", mismatched τ"))
    axes[row, 1].set_title(f"ℓ = (L − L0)/(L(1) − L0), L0 = {table[fn + '_fit']['L0']:.3f}")
    axes[row, 1].set_ylim(0.95, 2.0)
    axes[row, 2].semilogy(grid[:-1], delta[:-1], "C0", label="Δ(x), L0 fitted")
    axes[row, 2].semilogy(grid[:-1], sigma[:-1], "C0--", label="σ(x), L0 fitted")
    axes[row, 2].semilogy(grid[:-1], delta_b[:-1], "C1", label="Δ(x), L/L(1)")
    axes[row, 2].semilogy(grid[:-1], sigma_b[:-1], "C1--", label="σ(x), L/L(1)")
    axes[row, 2].axvspan(*XS, color="gray", alpha=0.1)
    axes[row, 2].legend(fontsize=7)
    axes[row, 2].set_title(f"{fn}: Δ vs seed floor σ")
for a in axes.flat:
    a.set_xlabel("x = tokens / D")
savefig(fig, "collapse_family")

fig, axes = P.subplots(1, 2, figsize=(12, 4.2))
for s, t in twins.items():
    axes[0].plot(t["x"], t["loss"], color="gray", lw=0.6, alpha=0.7, label="healthy twins (3 seeds)" if s == 0 else None)
axes[0].plot(fault["x"], fault["loss"], color="C3", lw=0.8, label=f"fault: schedule at {FAULT_SPEED:g}x speed from x={FAULT_AT}")
axes[0].set_ylim(min(fault["loss"].min(), 2) * 0.98, np.percentile(fault["loss"], 90) * 1.02)
axes[0].set_title(f"raw training loss, d{MID}")
axes[0].legend(fontsize=8)
m = fault["mon"]
axes[1].plot(m.grid, m.band, "k:", label="healthy band (5 × reference rms)")
axes[1].plot(m.grid, -m.band, "k:")
for s, t in twins.items():
    r = t["mon"]._track(t["mon"].xs, t["mon"].losses, t["mon"].ref)[1]
    axes[1].plot(t["x"], r, color="gray", lw=0.6, label="twins' residuals" if s == 0 else None)
axes[1].plot(fault["x"], fault["logged_resid"], color="C3", lw=0.9, label="fault residual (train.py --collapse_ref)")
axes[1].axvline(FAULT_AT, color="C3", ls="--", lw=0.8, label="fault starts")
if xa is not None:
    axes[1].axvline(xa, color="k", ls="-.", lw=0.8, label=f"first alert x = {xa:.2f}")
axes[1].set_ylim(-3 * m.band[m.grid > 0.2].max(), 3 * m.band[m.grid > 0.2].max())
axes[1].legend(fontsize=7)
for a in axes:
    a.set_xlabel("x = tokens / D")
savefig(fig, "collapse_monitor")

out["wall_s"] = {**walls, "total": time.time() - t0}
save_json("collapse_family", out)
print(f"done in {time.time() - t0:.0f}s")
