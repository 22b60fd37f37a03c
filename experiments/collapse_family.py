"""
Experiment 3 — loss-curve collapse of a family trained here (Qiu et al. 2025, arXiv 2507.02119;
Bergsma et al. 2025, arXiv 2509.25087):

  * the family: widths 16-64 at depth 2 (N + embedding 10.7k-116k, 10.9x), 3 seeds, TPP and τ = τ_opt(TPP) fixed,
    linear decay to zero, curves = validation loss on fixed windows evaluated ≈50 times per run
    (`common.recipe_flags`; seed 0 is experiment 4's grid run of the same name);
  * a control family: the same with the τ one λ (tuned at d = 32) gives at every size, τ ∝ 1/D: an 11x spread;
  * the family again at the LR sweep's best η = 2^-3 (Qiu et al.: supercollapse needs tuned hyperparameters);
  * Δ(x) against the seed floor σ(x) under L/L(1) (Bergsma) and (L − L0)/(L(1) − L0) with L0 fitted (Qiu);
  * forecasts of every run's final loss from its first 30%, the other sizes as reference; an LR sweep at one width
    ranked by those forecasts;
  * two subtle faults from 50% (the LR schedule at 2x speed, LR 0 from 75%; the LR halved): no spike; train.py's
    live monitor and a validation-curve monitor with a size-aware reference, and both on the three healthy twins.

    python experiments/collapse_family.py [--quick]
    python collapse.py analyze --runs=experiments/results/collapse_family.csv --offset=fit   # re-run the analysis
"""
import math
import os
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
SWEEP_LRS = [2 ** -8, 2 ** -7, 2 ** -5, 2 ** -4, 2 ** -3]   # plus LR (the family run itself)
FAULT_AT = 0.5                           # both faults start here (after the monitor's fit window x ≤ 0.5)
AT = 0.3                                 # forecasts from the first 30%
XS = (0.5, 0.95)                         # the supercollapse window


def name(kind, w, seed, **tag):
    extra = "".join(f"_{k}{v}" for k, v in tag.items())
    return f"{kind}/tpp{TPP:g}_T{STEPS}_w{w}_s{seed}{extra}"


def fast_decay(orig, at, speed=2.0):
    """The fault: from step at·T on, the schedule advances at `speed` × its rate, so with speed 2 the LR decays
    smoothly to 0 by x = 0.75 and the last quarter of the tokens is trained at LR 0 — a job restarted at 50% with
    the scheduler's step counted in micro-batches (2 per optimizer step after a change of world size or gradient
    accumulation). No spike anywhere: the raw loss even falls faster for a while."""
    def f(step, steps, *a, **k):
        s0 = at * steps
        s = np.where(np.asarray(step, float) >= s0, s0 + speed * (np.asarray(step, float) - s0), step)
        return orig(s if np.ndim(s) else float(s), steps, *a, **k)
    return f


def lr_scaled(orig, at, factor=0.5):
    """The fault: from step at·T on every LR is `factor` × its scheduled value — a relaunch at 50% that picked up a
    config with half the base LR (or µP's 1/m_N applied a second time: m_N = 2 at d = 32). No spike: the LR drops
    by half in one step, the loss keeps falling, only more slowly."""
    def f(step, steps, *a, **k):
        v = orig(step, steps, *a, **k)
        return v * np.where(np.asarray(step, float) >= at * steps, factor, 1.0) if np.ndim(v) else \
            v * (factor if step >= at * steps else 1.0)
    return f


FAULTS = {"fastdecay": (fast_decay, "LR schedule at 2x speed from x = 0.5 (LR 0 from x = 0.75)"),
          "halflr": (lr_scaled, "LR x 0.5 from x = 0.5"),
          "fourxdecay": (lambda orig, at: fast_decay(orig, at, 4.0),
                         "LR schedule at 4x speed from x = 0.5 (LR 0 from x = 0.625)")}


def stats(curves, offset, window=1):
    """collapse.analyze plus the Δ/σ ratio over x in XS."""
    res = C.analyze(curves, offset=offset, window=window, force=True)
    grid, L, ell, delta, sigma = res.pop("arrays")
    sel = (grid >= XS[0]) & (grid <= XS[1])
    if sigma is not None:
        r = delta[sel] / sigma[sel]
        above = np.nonzero(delta[:-1] > sigma[:-1])[0]   # Δ ≤ σ from this x to the end (x = 1 excluded: Δ(1) = 0)
        res.update(supercollapse_from_x=float(grid[above[-1] + 1]) if len(above) else float(grid[0]))
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


def forecast_trend(c, refs, at=AT, x_min=0.05):
    """Like collapse.forecast with the mean reference curve, but the reference ℓ(x) is regressed linearly on log N
    across the reference runs at every x and read off at the forecast run's N (the family's residual drift with size,
    measured on the other sizes only)."""
    grid, _, ell, _ = C.normalise(refs, "none", 1)
    lN = np.log([r.size for r in refs])
    A = np.stack([np.ones_like(lN), lN], 1)
    coef = np.linalg.lstsq(A, ell, rcond=None)[0]
    ref = coef[0] + coef[1] * math.log(c.size)
    pre = (c.x <= at + 1e-12) & (c.x >= x_min)
    return float(np.exp(np.mean(np.log(c.loss[pre]) - np.log(np.interp(c.x[pre], grid, ref)))))


t0 = time.time()
walls = {}


def timed(key, fn):
    t = time.time()
    out = fn()
    walls[key] = walls.get(key, 0.0) + time.time() - t
    return out


# ---- training (sequential, resumable): family, LR sweep, fault, control
FAM, CTL, SWEEP, FAULT = "collapse", "collapse_control", "collapse_sweep", "collapse_fault"
fam_dirs = [timed("family", lambda: train_run(name(FAM, w, s), **recipe_flags(w, s, TPP, lr=LR, steps=STEPS)))
            for s in SEEDS for w in WIDTHS]
sweep_dirs = {LR: os.path.join(RUNS, name(FAM, MID, 0))}
for lr in SWEEP_LRS:
    sweep_dirs[lr] = timed("sweep", lambda: train_run(name(SWEEP, MID, 0, lr=f"{math.log2(lr):g}"),
                                                     **recipe_flags(MID, 0, TPP, lr=lr, steps=STEPS)))
refs_dirs = [d for d, w in zip(fam_dirs, [w for s in SEEDS for w in WIDTHS]) if w != MID]
orig = mup.lr_factor
fault_dirs = {}
for kind, (make, _) in FAULTS.items():
    mup.lr_factor = make(orig, FAULT_AT)   # train.py calls mup.lr_factor every step
    try:
        fault_dirs[kind] = timed("fault", lambda: train_run(name(FAULT, MID, 0, **{kind: FAULT_AT}), quiet=True,
                                                            **recipe_flags(MID, 0, TPP, lr=LR, steps=STEPS,
                                                                           collapse_ref=",".join(refs_dirs))))
    finally:
        mup.lr_factor = orig
# control: one λ for every size (the one giving τ_opt at MID), with µP's width-scaled decay (λ·m_N on the hidden
# matrices, as --tau applies it), so τ = B/(ηλD) ∝ 1/D: τ_opt·D_MID/D at each size, an 11x spread over the family
D_of = lambda w: recipe_flags(w, 0, TPP, steps=STEPS)["tokens"]
TAU_CTL = {w: mup.tau_opt(TPP) * D_of(MID) / D_of(w) for w in WIDTHS}
lam = read_run(os.path.join(RUNS, name(FAM, MID, 0)))[0]["weight_decay"]   # that λ (base, embedding group)
ctl_dirs = [timed("control", lambda: train_run(name(CTL, w, s),
                                               **recipe_flags(w, s, TPP, lr=LR, tau=TAU_CTL[w], steps=STEPS)))
            for s in SEEDS for w in WIDTHS]
# the same family at the sweep's best η (2^-3, τ still τ_opt): Qiu et al. see supercollapse only when tuned
LR_TUNED = 2 ** -3
tuned_dirs = [sweep_dirs[LR_TUNED] if (w, s) == (MID, 0) else
              timed("tuned", lambda: train_run(name(FAM + "_lr-3", w, s),
                                               **recipe_flags(w, s, TPP, lr=LR_TUNED, steps=STEPS)))
              for s in SEEDS for w in WIDTHS]
print(f"trained in {time.time() - t0:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items()), flush=True)

# ---- curves and CSVs (the analysis below reads the CSVs, so `collapse.py analyze` sees exactly these numbers)
os.makedirs(RESULTS, exist_ok=True)
fam_csv = write_curves_csv([val_curve(d, TPP) for d in fam_dirs], os.path.join(RESULTS, "collapse_family.csv"))
ctl_csv = write_curves_csv([val_curve(d, TPP) for d in ctl_dirs], os.path.join(RESULTS, "collapse_control.csv"))
tun_csv = write_curves_csv([val_curve(d, TPP) for d in tuned_dirs], os.path.join(RESULTS, "collapse_tuned.csv"))
fam = C.load_curves(fam_csv)
ctl = C.load_curves(ctl_csv)
tun = C.load_curves(tun_csv)
for c in fam + ctl + tun:
    c.seed = int(float(c.seed))

out = {"widths": WIDTHS, "seeds": SEEDS, "tpp": TPP, "lr": LR, "tau": fam[0].tau, "control_lambda_at_mid": lam,
       "control_tau_by_width": TAU_CTL, "control_tau": {c.name: c.tau for c in ctl if c.seed == 0},
       "runs": {os.path.basename(d): {k: read_run(d)[0][k] for k in ("N", "D", "T", "B", "tau", "weight_decay")}
                for d in fam_dirs + ctl_dirs + tuned_dirs + list(sweep_dirs.values()) + list(fault_dirs.values())},
       "final_val": {c.name: float(c.loss[-1]) for c in fam + ctl},
       "final_val_tuned": {c.name: float(c.loss[-1]) for c in tun}, "lr_tuned": LR_TUNED}

# ---- Δ vs σ: both normalisations, family and control; plus the training-loss curves of the same runs (old way)
table = {}
arrays = {}
for fam_name, cs in (("family", fam), ("control", ctl), ("tuned", tun)):
    for off in ("none", "fit"):
        res, arr = stats(cs, off)
        table[f"{fam_name}_{off}"] = res
        arrays[f"{fam_name}_{off}"] = arr
        print(f"{fam_name:8s} offset={off:4s} L0={res['L0']:.3f}  Δ {np.round(res['delta'], 4)}"
              f"  σ {np.round(res['sigma'], 4)}"
              f"  Δ/σ on [{XS[0]}, {XS[1]}]: mean {res['ratio_mean']:.2f} max {res['ratio_max']:.2f}", flush=True)
train_curves = [C.load_run(d) for d in fam_dirs]   # size = non-embedding N: only groups the seeds
for off in ("none", "fit"):
    res, _ = stats(train_curves, off, window=9)
    table[f"family_trainloss_{off}"] = res
    print(f"family, training loss (9-pt smoothing) offset={off}: Δ/σ mean {res['ratio_mean']:.2f} "
          f"max {res['ratio_max']:.2f}")
# the same sizes with a fixed batch of 1,024 tokens (experiment 4's grid, seed 0: Δ without σ; T ∝ D), and the
# fixed-step recipe at TPP 10 (probe, seed 0)
grid_tpp = {}
for t, pat in ([(t, "grid/tpp%g_w%d_s0") for t in (10.0, 20.0, 40.0, 80.0)]
               + [(10.0, "collapse_probe/fixT105_tpp%g_w%d_s0")]):
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
    tr = forecast_trend(c, refs)
    fc.append({"run": c.name, "family": kind, "L1": float(c.loss[-1]), "L1_hat_trend": tr,
               "err_trend": tr / c.loss[-1] - 1,
               "L1_hat_ratio": r_plain["L1_hat"], "err_ratio": r_plain["L1_hat"] / c.loss[-1] - 1,
               "L1_hat_L0": l0_hat, "err_L0": l0_hat / c.loss[-1] - 1, "L0_used": L0})
for c in tun:   # the tuned family forecast from its own other sizes
    refs = [r for r in tun if r.size != c.size]
    r_plain = C.forecast_runs([c], refs, at=AT, shape="curve", force=True)["ranking"][0]
    tr = forecast_trend(c, refs)
    fc.append({"run": c.name, "family": "tuned", "L1": float(c.loss[-1]), "L1_hat_trend": tr,
               "err_trend": tr / c.loss[-1] - 1,
               "L1_hat_ratio": r_plain["L1_hat"], "err_ratio": r_plain["L1_hat"] / c.loss[-1] - 1,
               "L1_hat_L0": math.nan, "err_L0": math.nan, "L0_used": None})
fsum = {}
for f in ("family", "control", "tuned"):
    for k in ("err_ratio", "err_L0", "err_trend"):
        if f == "tuned" and k == "err_L0":
            continue
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
               "L1_hat_L0": forecast_L0(c, refs)[0], "L1_hat_trend": forecast_trend(c, refs)})
best = lambda k: min(sw, key=lambda r: r[k])["log2_lr"]
out["sweep"] = {"width": MID, "runs": sw, "true_best": best("L1"), "picked_ratio": best("L1_hat_ratio"),
                "picked_L0": best("L1_hat_L0"), "picked_trend": best("L1_hat_trend"),
                "picked_naive_at30": best("L_at30")}
print("LR sweep at d%d: true best 2^%g, forecast picks 2^%g (L/L(1)) and 2^%g (L0), lowest loss at 30%%: 2^%g" %
      (MID, out["sweep"]["true_best"], out["sweep"]["picked_ratio"], out["sweep"]["picked_L0"],
       out["sweep"]["picked_naive_at30"]))
for r in sw:
    print(f"   η=2^{r['log2_lr']:g}: final {r['L1']:.4f}, at 30% {r['L_at30']:.4f}, forecast {r['L1_hat_ratio']:.4f} "
          f"(L/L(1)) / {r['L1_hat_L0']:.4f} (L0) / {r['L1_hat_trend']:.4f} (trend)")

# ---- the faults. (1) train.py's live monitor (--collapse_ref: training loss, L/L(1) reference = the mean of the
# other sizes), replayed identically here on the faults and on the three healthy twins (d = MID, seeds 0-2);
# (2) the same monitor logic on the validation curves with a size-aware reference (ℓ_ref regressed on log N across
# the other sizes, as forecast_trend) and its band from the reference runs replayed leave-one-size-out. Both causal:
# at x the monitor uses the run's points up to x and L̂(1) fitted on 0.05 ≤ x ≤ 0.5, frozen afterwards.
mon_refs = [C.load_run(d) for d in refs_dirs]


def monitor(d):
    cfg, lines, ev = read_run(d)
    m = C.CollapseMonitor(mon_refs)
    xs = np.array([l["tokens"] / cfg["D"] for l in lines])
    ups = [m.update(x, l["loss"]) for x, l in zip(xs, lines)]
    alerts = np.array([u["alert"] for u in ups])
    return {"x": xs, "loss": np.array([l["loss"] for l in lines]), "alerts": alerts, "mon": m,
            "smoothed": np.array([u["smoothed"] for u in ups]), "band": np.array([u["band"] for u in ups]),
            "first_alert": float(xs[np.argmax(alerts)]) if alerts.any() else None, "n_alerts": int(alerts.sum()),
            "final_val": ev[-1]["val"]["prose"]}


def trend_ref(refs):
    grid, _, ell, _ = C.normalise(refs, "none", 1)
    lN = np.log([r.size for r in refs])
    coef = np.linalg.lstsq(np.stack([np.ones_like(lN), lN], 1), ell, rcond=None)[0]
    return lambda N, x: np.interp(x, grid, coef[0] + coef[1] * math.log(N))


def track(c, ref, fit_until=0.5, x_min=0.05, window=3):
    """Residual L/L̂(1) − ℓ_ref(x; N) at every eval of c and its trailing mean over `window` evals (causal)."""
    r_x = ref(c.size, c.x)
    d = np.log(c.loss) - np.log(r_x)
    m = ((c.x >= x_min) & (c.x <= fit_until)).astype(float)
    cn, cs = np.cumsum(m), np.cumsum(d * m)
    r = c.loss / np.exp(np.where(cn > 0, cs / np.maximum(cn, 1), d)) - r_x
    k = np.minimum(np.arange(1, len(r) + 1), window)
    cc = np.concatenate([[0.0], np.cumsum(r)])
    return (cc[1:] - cc[np.arange(1, len(r) + 1) - k]) / k


def val_band(refs, margin=5.0, x_min=0.05):
    """margin × the rms (within ±0.1 in x) of the reference runs' smoothed residuals, each replayed against the
    trend of the other sizes (collapse.CollapseMonitor's rule, leave one size out)."""
    px, ps = [], []
    for size in sorted({r.size for r in refs}):
        ref = trend_ref([r for r in refs if r.size != size])
        for c in [r for r in refs if r.size == size]:
            px.append(c.x[c.x >= x_min])
            ps.append(track(c, ref)[c.x >= x_min])
    px, ps = np.concatenate(px), np.concatenate(ps)
    g = np.linspace(0, 1, 201)
    near = np.abs(g[:, None] - px[None, :]) <= 0.1
    rms = np.sqrt((near * ps ** 2).sum(1) / np.maximum(near.sum(1), 1))
    return g, margin * rms


val_refs = [c for c in fam if c.size != fam[WIDTHS.index(MID)].size]
v_ref = trend_ref(val_refs)
vb_grid, vb = val_band(val_refs)


def val_monitor(c, margin=5.0):
    sm = track(c, v_ref)
    band = np.interp(c.x, vb_grid, vb) * margin / 5.0
    al = (np.abs(sm) > band) & (c.x >= 0.05)
    return {"x": c.x, "loss": c.loss, "smoothed": sm, "band": band, "n_alerts": int(al.sum()),
            "first_alert": float(c.x[np.argmax(al)]) if al.any() else None,
            "max_ratio": float(np.max(np.abs(sm) / band))}


twins = {s: monitor(os.path.join(RUNS, name(FAM, MID, s))) for s in SEEDS}
twins_v = {s: val_monitor(c) for s, c in enumerate([c for c in fam if c.size == fam[WIDTHS.index(MID)].size])}
tw_final = np.array([t["final_val"] for t in twins.values()])
out["fault"] = {"width": MID, "at": FAULT_AT, "twins_final_val": tw_final.tolist(),
                "twins_seed_sd_rel": float(tw_final.std(ddof=1) / tw_final.mean()),
                "twins_false_alerts_live": {str(s): t["n_alerts"] for s, t in twins.items()},
                "twins_false_alerts_val": {str(s): t["n_alerts"] for s, t in twins_v.items()},
                "twins_max_val_residual_over_band": {str(s): t["max_ratio"] for s, t in twins_v.items()},
                "twins_false_alerts_val_by_margin": {str(mg): [val_monitor(c, mg)["n_alerts"] for c in fam
                                                               if c.size == fam[WIDTHS.index(MID)].size]
                                                     for mg in (3.0, 4.0, 5.0)},
                "max_step_jump_twins": float(max(np.max(np.abs(np.diff(t["loss"]))) for t in twins.values())),
                "faults": {}}
faults, faults_v = {}, {}
for kind, d in fault_dirs.items():
    f = faults[kind] = monitor(d)
    fv = faults_v[kind] = val_monitor(val_curve(d, TPP))
    vt = np.array([c.loss for c in fam if c.size == fam[WIDTHS.index(MID)].size])   # twins' val curves (same grid)
    xa = fv["first_alert"]
    gap = None
    if xa is not None:   # what the raw validation loss showed at the alert: the fault vs its twins
        k = int(np.argmax(fv["x"] >= xa))
        gap = {"fault": float(fv["loss"][k]), "twins": vt[:, k].tolist(),
               "excess_over_twin_mean": float(fv["loss"][k] / vt[:, k].mean() - 1)}
    out["fault"]["faults"][kind] = {
        "kind": FAULTS[kind][1], "final_val": f["final_val"],
        "final_val_excess": float(f["final_val"] / tw_final.mean() - 1),
        "live_first_alert_x": f["first_alert"], "live_n_alerts": f["n_alerts"],
        "live_max_residual_over_band": float(np.nanmax(np.abs(f["smoothed"]) / f["band"])),
        "val_first_alert_x": xa, "val_n_alerts": fv["n_alerts"], "val_max_residual_over_band": fv["max_ratio"],
        "val_at_alert": gap, "max_step_jump": float(np.max(np.abs(np.diff(f["loss"])))),
        "val_first_alert_x_by_margin": {str(mg): val_monitor(val_curve(d, TPP), mg)["first_alert"]
                                        for mg in (3.0, 4.0, 5.0)}}
    o = out["fault"]["faults"][kind]
    print(f"fault {kind} ({o['kind']}): final val {o['final_val']:.4f} vs twins {np.round(tw_final, 4)} "
          f"({100 * o['final_val_excess']:+.2f}%); live monitor first alert {o['live_first_alert_x']} "
          f"(max |residual|/band {o['live_max_residual_over_band']:.2f}); validation monitor first alert {xa} "
          f"({fv['n_alerts']} alerts); raw val at alert {gap}")
print(f"twins: live false alerts {out['fault']['twins_false_alerts_live']}, validation-monitor false alerts "
      f"{out['fault']['twins_false_alerts_val']} (max |residual|/band "
      f"{out['fault']['twins_max_val_residual_over_band']})")

# ---- plots
P = plt()
fig, axes = P.subplots(2, 3, figsize=(16, 8.5))
for row, (fn, cs) in enumerate((("family", fam), ("control", ctl))):
    grid, L, _, delta, sigma = arrays[f"{fn}_fit"]
    _, _, ell_b, delta_b, sigma_b = arrays[f"{fn}_none"]
    for i, c in enumerate(cs):
        col = f"C{WIDTHS.index(int(c.name.split('_w')[1].split('_')[0]))}"
        axes[row, 0].plot(grid, L[i], color=col, lw=0.8, ls=["-", "--", ":"][c.seed % 3],
                          label=f"d{c.name.split('_w')[1].split('_')[0]}" if c.seed == 0 else None)
        axes[row, 1].plot(grid, ell_b[i], color=col, lw=0.8, ls=["-", "--", ":"][c.seed % 3])
    axes[row, 0].set_yscale("log")
    axes[row, 0].set_title(f"{fn}: validation loss, TPP {TPP:g}" + (", τ_opt" if fn == "family" else ", mismatched τ"))
    axes[row, 0].legend(fontsize=7)
    axes[row, 1].set_title("ℓ = L/L(1) (seeds: solid, dashed, dotted)")
    axes[row, 1].set_ylim(0.99, 1.35)
    axes[row, 2].semilogy(grid[:-1], delta[:-1], "C0", label=f"Δ(x), L0 fitted ({table[fn + '_fit']['L0']:.2f})")
    axes[row, 2].semilogy(grid[:-1], sigma[:-1], "C0--", label="σ(x), L0 fitted")
    axes[row, 2].semilogy(grid[:-1], delta_b[:-1], "C1", label="Δ(x), L/L(1)")
    axes[row, 2].semilogy(grid[:-1], sigma_b[:-1], "C1--", label="σ(x), L/L(1)")
    axes[row, 2].axvspan(*XS, color="gray", alpha=0.1)
    axes[row, 2].legend(fontsize=7)
    axes[row, 2].set_title(f"{fn}: Δ vs seed floor σ")
for a in axes.flat:
    a.set_xlabel("x = tokens / D")
savefig(fig, "collapse_family")

fig, axes = P.subplots(1, 3, figsize=(17, 4.5))
vt = [c for c in fam if c.size == fam[WIDTHS.index(MID)].size]
for i, c in enumerate(vt):
    axes[0].plot(c.x, c.loss, color="gray", lw=0.8, label="healthy twins (3 seeds)" if i == 0 else None)
for j, (kind, fv) in enumerate(faults_v.items()):
    axes[0].plot(fv["x"], fv["loss"], color=f"C{j + 3}", lw=0.9, label=f"fault: {FAULTS[kind][1]}")
axes[0].set_ylim(2.1, 2.6)
axes[0].set_title(f"raw validation loss, d{MID}")
axes[0].legend(fontsize=7)
axes[1].plot(vb_grid, vb, "k:", label="band (5 × reference rms, leave one size out)")
axes[1].plot(vb_grid, -vb, "k:")
for i, t in twins_v.items():
    axes[1].plot(t["x"], t["smoothed"], color="gray", lw=0.8, label="twins" if i == 0 else None)
for j, (kind, fv) in enumerate(faults_v.items()):
    axes[1].plot(fv["x"], fv["smoothed"], color=f"C{j + 3}", lw=1, label=kind)
    if fv["first_alert"] is not None:
        axes[1].axvline(fv["first_alert"], color=f"C{j + 3}", ls="-.", lw=0.8,
                        label=f"{kind}: first alert x={fv['first_alert']:.2f}")
axes[1].axvline(FAULT_AT, color="k", ls="--", lw=0.6)
axes[1].set_ylim(-0.06, 0.08)
axes[1].set_title("validation monitor: size-aware reference")
axes[1].legend(fontsize=7)
m = twins[0]
for s_, t in twins.items():
    axes[2].plot(t["x"], t["smoothed"], color="gray", lw=0.6, label="twins" if s_ == 0 else None)
axes[2].plot(m["x"], m["band"], "k:", label="band (train.py monitor)")
axes[2].plot(m["x"], -m["band"], "k:")
for j, (kind, f) in enumerate(faults.items()):
    axes[2].plot(f["x"], f["smoothed"], color=f"C{j + 3}", lw=0.8, label=kind)
axes[2].axvline(FAULT_AT, color="k", ls="--", lw=0.6)
axes[2].set_ylim(-0.15, 0.15)
axes[2].set_title("train.py --collapse_ref (training loss, L/L(1) reference)")
axes[2].legend(fontsize=7)
for a in axes:
    a.set_xlabel("x = tokens / D")
savefig(fig, "collapse_monitor")

out["wall_s"] = {**walls, "total": time.time() - t0}
save_json("collapse_family", out)
print(f"done in {time.time() - t0:.0f}s")
