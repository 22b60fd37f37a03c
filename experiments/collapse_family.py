"""
Experiment 3 — loss-curve collapse (SPEC §6): a width family at fixed TPP trained with τ = τ_opt(TPP) and linear
decay to zero, two seeds; the same family with one fixed weight decay (so τ varies with size); final-loss
forecasts from the first 30% of each run; and the live monitor against an LR spike injected at 60%.

    python experiments/collapse_family.py [--quick]

Claims (Bergsma et al. 2025; Qiu et al. 2025): with τ, schedule and TPP fixed the normalised curves collapse,
late in training the spread Δ(x) across sizes falls to the seed noise floor σ(x) or below ("supercollapse");
mismatched τ breaks the collapse; the collapsed curve forecasts the final loss from a partial run to ≈1%;
a run whose residual leaves the healthy band is flagged long before its raw loss looks wrong.
"""
import math
import os
import time

import numpy as np

from common import RUNS, family_flags, plt, quick, read_run, save_json, savefig, train_run, train  # noqa: I001 (sets sys.path)
import collapse as C

WIDTHS = [16, 24] if quick() else [16, 24, 32, 48]
SEEDS = [0, 1]
TPP = 20.0                        # Chinchilla-optimal scale; experiments 4 and 5 reuse these runs
LR = 2 ** -6                      # base η of the µP/CompleteP proxy (d_base = 16), near BTLM's 1.2e-2
SPIKE, SPIKE_AT, FAULT_W = 10.0, 0.6, 24 if quick() else 32
WINDOW = 9                        # points of moving average before normalising (train loss of one step is noisy)


def flags(w, seed, **extra):
    return family_flags(w, seed, TPP, lr=LR, **extra)


t0 = time.time()
healthy = [train_run(f"collapse/opt_w{w}_s{s}", **flags(w, s, tau="opt")) for s in SEEDS for w in WIDTHS]
# mismatched τ: one weight decay for every size, the λ that gives τ_opt at the middle width
mid = read_run(os.path.join(RUNS, f"collapse/opt_w{WIDTHS[len(WIDTHS) // 2]}_s0"))[0]
lam = mid["weight_decay"]
mismatched = [train_run(f"collapse/fixwd_w{w}_s0", **flags(w, 0, weight_decay=lam)) for w in WIDTHS]

# the fault: the same recipe at one width, LR ×SPIKE from 60% of the steps on, monitored live against the
# healthy runs of the OTHER widths (both seeds). train.py has no fault switch, so the schedule is wrapped here.
refs = [d for d in healthy if f"_w{FAULT_W}_" not in d]
orig = train.lr_factor
train.lr_factor = lambda step, T, cfg: orig(step, T, cfg) * (SPIKE if step >= SPIKE_AT * T else 1.0)
try:
    fault = train_run(f"collapse/fault_w{FAULT_W}", **flags(FAULT_W, 0, tau="opt", collapse_ref=",".join(refs)))
finally:
    train.lr_factor = orig

# --- collapse statistics: Δ(x) across sizes × seeds against the seed noise floor σ(x)
curves = [C.load_run(d) for d in healthy]
res = C.analyze(curves, window=WINDOW, force=True)   # TPP differs by <1% (whole steps)
grid, L, ell, delta, sigma = res.pop("arrays")
mis_curves = [C.load_run(d) for d in mismatched]
res_mis = C.analyze(mis_curves + [c for c in curves if c.seed == 0], window=WINDOW, force=True)
_, _, ell_mis, delta_mis, _ = res_mis.pop("arrays")
print("tau_opt family:  x", res["x"], "Δ", np.round(res["delta"], 4), "σ", np.round(res["sigma"], 4))
print("mismatched τ:    Δ", np.round(res_mis["delta"], 4))

# --- forecasts of the final loss from the first 30%: reference = the healthy runs of the other widths
fc = []
for c, d in zip(curves + mis_curves, healthy + mismatched):
    others = [r for r in curves if r.size != c.size]
    for shape in ("curve", "param"):
        r = C.forecast_runs([c], others, at=0.3, shape=shape, window=WINDOW, force=True)["ranking"][0]
        fc.append({"run": os.path.basename(d), "shape": shape, "L1_hat": r["L1_hat"], "L1": r["L1"], "err": r["err"]})
for shape in ("curve", "param"):
    for fam in ("opt", "fixwd"):
        e = [abs(r["err"]) for r in fc if r["shape"] == shape and r["run"].startswith(fam)]
        print(f"forecast at 30%, {shape} reference, {fam} family: mean |err| {100 * np.mean(e):.2f}%  max {100 * np.max(e):.2f}%")

# --- the live monitor's record: first alert in the fault run; false alerts in a healthy run of the same width
_, lines, _ = read_run(fault)
fcfg = read_run(fault)[0]
res_x = np.array([l["tokens"] / fcfg["D"] for l in lines])
resid = np.array([l.get("collapse_residual", math.nan) for l in lines])
mon = C.CollapseMonitor(refs)
alerts = [mon.update(x, l["loss"])["alert"] for x, l in zip(res_x, lines)]
first_alert = float(res_x[np.argmax(alerts)]) if any(alerts) else None
hc = read_run(os.path.join(RUNS, f"collapse/opt_w{FAULT_W}_s1"))
mon_h = C.CollapseMonitor(refs)
h_alerts = sum(mon_h.update(l["tokens"] / hc[0]["D"], l["loss"])["alert"] for l in hc[1])
raw_h = np.array([l["loss"] for l in hc[1]])
print(f"fault: LR ×{SPIKE} from x={SPIKE_AT}; first monitor alert at x={first_alert}; healthy twin false alerts: {h_alerts}")

# --- plots
P = plt()
fig, axes = P.subplots(1, 3, figsize=(15, 4))
for i, c in enumerate(curves):
    axes[0].plot(grid, L[i], color=f"C{i % len(WIDTHS)}", ls="-" if c.seed == 0 else "--", lw=1)
    axes[1].plot(grid, ell[i], color=f"C{i % len(WIDTHS)}", ls="-" if c.seed == 0 else "--", lw=1, label=c.name)
axes[0].set_title(f"raw train loss (smoothed), TPP {TPP:g}, τ_opt")
axes[1].set_title("normalised ℓ = L/L(1)")
axes[1].set_ylim(0.98, 1.3)
axes[1].legend(fontsize=6)
axes[2].semilogy(grid, delta, label="Δ(x), τ_opt family (sizes × seeds)")
axes[2].semilogy(grid, sigma, label="σ(x), seed noise floor")
axes[2].semilogy(grid, delta_mis, label="Δ(x), fixed λ (τ varies) + seed 0 τ_opt")
axes[2].set_xlabel("x = tokens / D")
axes[2].legend(fontsize=8)
axes[2].set_title("collapse deviation vs noise floor")
for ax in axes[:2]:
    ax.set_xlabel("x = tokens / D")
savefig(fig, "collapse_family")

fig, axes = P.subplots(1, 2, figsize=(11, 4))
axes[0].plot(res_x, [l["loss"] for l in lines], label=f"fault run (LR ×{SPIKE} from x={SPIKE_AT})", lw=1)
axes[0].plot([l["tokens"] / hc[0]["D"] for l in hc[1]], raw_h, label="healthy twin (seed 1)", lw=1)
axes[0].set_title("raw train loss, width %d" % FAULT_W)
axes[0].legend(fontsize=8)
axes[1].plot(res_x, resid, label="smoothed residual (train.py --collapse_ref)")
axes[1].plot(mon.grid, mon.band, "k:", label="healthy band")
axes[1].plot(mon.grid, -mon.band, "k:")
if first_alert is not None:
    axes[1].axvline(first_alert, color="r", lw=1, label=f"first alert x={first_alert:.2f}")
axes[1].axvline(SPIKE_AT, color="gray", ls="--", lw=1, label="fault starts")
axes[1].set_ylim(-4 * mon.band[mon.grid > 0.3].max(), 6 * mon.band[mon.grid > 0.3].max())
axes[1].legend(fontsize=8)
for ax in axes:
    ax.set_xlabel("x = tokens / D")
savefig(fig, "collapse_monitor")

save_json("collapse_family", {
    "widths": WIDTHS, "seeds": SEEDS, "tpp": TPP, "lr": LR, "window": WINDOW,
    "runs": {os.path.basename(d): {k: read_run(d)[0][k] for k in ("N", "D", "T", "B", "tau", "weight_decay")}
             for d in healthy + mismatched + [fault]},
    "final_val": {os.path.basename(d): read_run(d)[2][-1]["val"]["prose"] for d in healthy + mismatched + [fault]},
    "opt_family": res, "mismatched_family": res_mis, "forecasts_at_0.3": fc,
    "fault": {"spike": SPIKE, "at": SPIKE_AT, "width": FAULT_W, "first_alert_x": first_alert,
              "healthy_twin_false_alerts": int(h_alerts)},
    "wall_s": time.time() - t0})
print(f"done in {time.time() - t0:.0f}s")
