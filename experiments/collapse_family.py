"""
Experiment 3 — loss-curve collapse of a family trained here (Qiu et al. 2025, arXiv 2507.02119;
Bergsma et al. 2025, arXiv 2509.25087), third design:

  * the family: widths 16-64 at depth 2 (N + embedding 10.7k-116k, 10.9x), 5 seeds, `family()` below: code, TPP on
    non-embedding N, τ = τ_opt(TPP) for every decayed group, linear decay to zero, every size ≈ 417 steps, curves =
    validation loss on fixed windows evaluated ≈50 times per run, η = 2^-6.5; the recipe was chosen by the seed-0
    probes of experiments/collapse_probe.py;
  * a control family: the same at constant LR (Qiu et al.: no supercollapse without LR decay), 3 seeds;
  * Δ(x) against the seed floor σ(x) (Qiu's definitions) under L/L(1) (Bergsma) and (L − L0)/(L(1) − L0), L0 fitted;
  * forecasts of every run's final loss from its first 30%, the other sizes as reference (their mean curve, and the
    curve regressed on log N); LR and τ sweeps at one width ranked by those forecasts;
  * subtle faults from x = 0.3 at one width (a loader that re-reads one shard of 0.5-2% of the data, a quarter or a
    tenth of the batches silently from another domain, weight decay silently off, the warm-up re-run, the LR
    halved): no spike in the validation loss; a validation monitor with the other sizes as reference, on the faults
    and on the healthy twins (the 5 seeds of that width);
  * the same recipe at η = 2^-6 (family and control), kept for comparison.

    python experiments/collapse_family.py [--quick]
    python collapse.py analyze --runs=experiments/results/collapse_family.csv   # re-run the collapse analysis
"""
import contextlib
import math
import os
import time
from unittest import mock

import numpy as np
import torch

from common import (RESULTS, RUNS, n_params, plt, quick, read_run, recipe_flags, save_json,  # noqa: I001
                    savefig, train_run, val_curve, window_stats, write_curves_csv)
import collapse as C
import data as data_mod
import model as model_mod
import mup

WIDTHS = [16, 24, 32] if quick() else [16, 24, 32, 48, 64]
SEEDS = [0, 1] if quick() else [0, 1, 2, 3, 4]   # Qiu et al.: 5 seeds "necessary for the best collapse"
CTL_SEEDS = [0, 1] if quick() else [0, 1, 2]
TPP = 10.0 if quick() else 40.0    # tokens per NON-embedding parameter
STEPS = 105 if quick() else 417    # every size takes ≈ this many steps: B ∝ D, in whole sequences of 128
LR = 2 ** -6.5   # chosen by the seed-0 probes (collapse_probe.py): ℓ(0.5) drifts +0.0065 per ln N at 2^-6, −0.0074 at
LR_CMP = 2 ** -6  # 2^-7, +0.0007 at 2^-6.5; the family at 2^-6 (experiment 1's µP optimum) is kept for comparison
DOMAIN, OTHER = "stdlib", "prose"  # the family trains on Python code (11.3M tokens: no run repeats data); faults mix in
MID = WIDTHS[len(WIDTHS) // 2]     # sweeps and faults at this width
SWEEP_LRS = [2 ** -8, 2 ** -7, 2 ** -5, 2 ** -4, 2 ** -3]      # plus LR and LR_CMP (their family runs)
SWEEP_TAUS = [0.25, 0.5, 2.0, 4.0]                              # × τ_opt, plus τ_opt itself
FAULT_AT = 0.3                     # faults start here: after the monitor's fit window 0.05 ≤ x ≤ 0.3
AT = 0.3                           # forecasts from the first 30%
XS = (0.5, 0.95)                   # the supercollapse window
MARGIN = 5.0                       # monitor band = MARGIN × the reference runs' rms (the previous design's value)


def family(w, seed, **kw):
    """The family's train.py flags at width w: Python code (stdlib), D = TPP × non-embedding N (the embedding is 39%
    of N + embedding at d16, 14% at d64), τ = τ_opt(TPP) at every size, ≈ STEPS steps, train.py's clipping (1.0)."""
    n, n_tot = n_params(w)
    f = recipe_flags(w, seed, TPP * n / n_tot, lr=LR, steps=STEPS, quantum=128, data=DOMAIN)
    f["tau"] = f"{mup.tau_opt(TPP):.6g}"
    f.update(kw)
    return f


def name(kind, w, seed, **tag):
    return f"{kind}/ne{TPP:g}_T{STEPS}_w{w}_s{seed}" + "".join(f"_{k}{v}" for k, v in tag.items())


# ---- faults, injected in-process by patching what train.py calls (train.py has no fault switch); each returns a
# context manager that installs the fault and undoes it on exit
def mixture_shift(frac, domain=OTHER, at=FAULT_AT):
    """From step at·steps on, `frac` of every batch's sequences come from `domain` instead of the run's mixture: a
    loader that, after a restart, reads a shard list with another domain's shards in it. data.Batches is wrapped."""
    orig = data_mod.Batches

    class Shifted(orig):
        def __init__(self, domains, weights, batch_tokens, seq_len_schedule, total_tokens, seed):
            super().__init__(domains, weights, batch_tokens, seq_len_schedule, total_tokens, seed)
            self.other = data_mod.Dataset(os.path.join("data", domain))
            self.start = at * total_tokens / batch_tokens

        def get(self, step, rank=0, world_size=1):
            x, y, T = super().get(step, rank, world_size)
            k = round(frac * x.size(0))
            if step >= self.start and k:
                rows = torch.from_numpy(self.other.sample("train", T, np.random.default_rng([self.seed, step, 1])
                                                          .random(k)))
                pos = np.linspace(0, x.size(0) - 1, k).round().astype(int)   # spread over the micro-batches
                x[pos], y[pos] = rows[:, :-1], rows[:, 1:]
            return x, y, T

    return mock.patch.object(data_mod, "Batches", Shifted)


def shard_slice(frac, at=FAULT_AT):
    """From step at·steps on, every training window comes from the first `frac` of the training tokens: a loader
    that, after a restart, reads one shard of the list instead of all of them, so the rest of the run re-reads it.
    data.Batches is wrapped; the windows' random positions are the healthy run's, squeezed into that slice."""
    orig = data_mod.Batches

    class Narrowed(orig):
        def __init__(self, domains, weights, batch_tokens, seq_len_schedule, total_tokens, seed):
            super().__init__(domains, weights, batch_tokens, seq_len_schedule, total_tokens, seed)
            self.start = at * total_tokens / batch_tokens

        def get(self, step, rank=0, world_size=1):
            if step < self.start:
                return super().get(step, rank, world_size)
            saved = [ds.sample for ds in self.domains]
            for ds, f in zip(self.domains, saved):
                ds.sample = lambda split, T, u, f=f: f(split, T, np.asarray(u) * frac)
            try:
                return super().get(step, rank, world_size)
            finally:
                for ds, f in zip(self.domains, saved):
                    ds.sample = f

    return mock.patch.object(data_mod, "Batches", Narrowed)


def schedule_fault(make):
    """Wrap mup.lr_factor (train.py calls it every step) with make(orig) -> new function."""
    return mock.patch.object(mup, "lr_factor", make(mup.lr_factor))


def rewarm(at=FAULT_AT, warmup=0.1):
    """At step at·T the LR warm-up runs again (from 0, over 10% of the steps): a resume that restored the model and
    the optimizer but restarted the scheduler's warm-up. The LR only goes down then back up: no spike."""
    def make(orig):
        def f(step, steps, *a, **k):
            s = np.asarray(step, float)
            ramp = np.clip((s - at * steps) / (warmup * steps), 0, 1)
            v = orig(step, steps, *a, **k) * np.where(s >= at * steps, ramp, 1.0)
            return v if np.ndim(v) else float(v)
        return f
    return schedule_fault(make)


def lr_scaled(factor=0.5, at=FAULT_AT):
    """From step at·T every LR is factor × its scheduled value (a relaunch with half the base LR)."""
    def make(orig):
        def f(step, steps, *a, **k):
            v = orig(step, steps, *a, **k)
            return v * np.where(np.asarray(step, float) >= at * steps, factor, 1.0) if np.ndim(v) else \
                v * (factor if step >= at * steps else 1.0)
        return f
    return schedule_fault(make)


@contextlib.contextmanager
def wd_off(at=FAULT_AT):
    """From step at·T on, weight decay is 0 in every group (a relaunch whose config lost --tau): the optimizer is
    caught when train.py builds it, and mup.lr_factor, called at every step, switches its λ off."""
    opt, orig_conf, orig_lr = [], model_mod.GPT.configure_optimizers, mup.lr_factor

    def conf(self, *a, **k):
        opt.append(orig_conf(self, *a, **k))
        return opt[-1]

    def lr(step, steps, *a, **k):
        if np.ndim(step) == 0 and step >= at * steps and opt:
            for g in opt[-1].param_groups:
                g["weight_decay"] = 0.0
        return orig_lr(step, steps, *a, **k)

    with mock.patch.object(model_mod.GPT, "configure_optimizers", conf), mock.patch.object(mup, "lr_factor", lr):
        yield


REPEAT = ["shard1", "shard2"]   # also run at seeds 1 and 2
FAULTS = {"mix25": (lambda: mixture_shift(0.25), f"25% of the sequences from {OTHER} from x = 0.3"),
          "mix10": (lambda: mixture_shift(0.10), f"10% of the sequences from {OTHER} from x = 0.3"),
          "shard2": (lambda: shard_slice(0.02), "every window from the first 2% of the training set from x = 0.3"),
          "shard05": (lambda: shard_slice(0.005), "every window from the first 0.5% of the training set from x = 0.3"),
          "shard1": (lambda: shard_slice(0.01), "every window from the first 1% of the training set from x = 0.3"),
          "wdoff": (wd_off, "weight decay off from x = 0.3"),
          "rewarm": (rewarm, "LR warm-up re-run at x = 0.3 (0 → schedule over 10% of the steps)"),
          "halflr": (lr_scaled, "LR × 0.5 from x = 0.3")}


# ---- analysis helpers
def forecast(c, refs, shape):
    """L̂(1) of run c from its points 0.05 ≤ x ≤ AT (collapse.forecast_runs), against the references' mean shape
    ("curve") or their shape regressed on log N at c's size ("size")."""
    return C.forecast_runs([c], refs, AT, shape, force=True)["ranking"][0]["L1_hat"]


def monitor(c, refs, size, margin=MARGIN):
    """collapse.CollapseMonitor, what train.py --collapse_ref runs, replayed over a validation curve (one update per
    evaluation): the references' shape at `size` (None: their mean shape), L(1) fitted on 0.05 ≤ x ≤ 0.3 and frozen
    after, the residual's trailing mean over 3 evaluations, the band margin × the references' own rms."""
    m = C.CollapseMonitor(refs, size=size, margin=margin)   # train.py's settings: fit until x = 0.3, window 3
    rs = [m.update(x, l) for x, l in zip(c.x, c.loss)]
    sm, b = (np.array([r[k] for r in rs]) for k in ("smoothed", "band"))
    al = np.array([r["alert"] for r in rs])
    return {"smoothed": sm, "band": b, "n_alerts": int(al.sum()),
            "first_alert": float(c.x[np.argmax(al)]) if al.any() else None,
            "max_ratio": float(np.max((np.abs(sm) / b)[c.x >= 0.05]))}


if __name__ == "__main__":
    t0 = time.time()
    walls = {}

    def timed(key, fn):
        t = time.time()
        out = fn()
        walls[key] = walls.get(key, 0.0) + time.time() - t
        return out

    # ---- training (sequential, resumable): family, control, sweeps, faults
    FAM = f"collapse3_lr{math.log2(LR):g}"
    CTL, SWEEP, FAULT = FAM + "_constlr", FAM + "_sweep", FAM + "_fault"
    CMP = "collapse3"   # the same recipe at LR_CMP = 2^-6 (the first family of this design), and its control
    fam_dirs = [timed("family", lambda: train_run(name(FAM, w, s), **family(w, s))) for s in SEEDS for w in WIDTHS]
    ctl_dirs = [timed("control", lambda: train_run(name(CTL, w, s), **family(w, s, schedule="constant")))
                for s in CTL_SEEDS for w in WIDTHS]
    cmp_dirs = [timed("family_2^-6", lambda: train_run(name(CMP, w, s), **family(w, s, lr=LR_CMP)))
                for s in SEEDS for w in WIDTHS]
    cmp_ctl_dirs = [timed("control_2^-6", lambda: train_run(name(CMP + "_constlr", w, s),
                                                            **family(w, s, lr=LR_CMP, schedule="constant")))
                    for s in CTL_SEEDS for w in WIDTHS]
    lr_dirs = {LR: os.path.join(RUNS, name(FAM, MID, 0)), LR_CMP: os.path.join(RUNS, name(CMP, MID, 0))}
    for lr in SWEEP_LRS:   # the η sweep does not depend on the family's η: its runs keep the first family's names
        lr_dirs[lr] = timed("sweep", lambda: train_run(name(CMP + "_sweep", MID, 0, lr=f"{math.log2(lr):g}"),
                                                      **family(MID, 0, lr=lr)))
    tau0 = mup.tau_opt(TPP)
    tau_dirs = {1.0: os.path.join(RUNS, name(FAM, MID, 0))}
    for k in SWEEP_TAUS:
        tau_dirs[k] = timed("sweep", lambda: train_run(name(SWEEP, MID, 0, tau=f"{k:g}x"),
                                                      **family(MID, 0, tau=f"{k * tau0:.6g}")))
    # the faults train with train.py's live monitor: reference = the family runs of the other widths, all seeds
    live_ref = ",".join(d for d in fam_dirs if f"_w{MID}_" not in d)
    fault_dirs = {}
    for kind, (make, _) in FAULTS.items():
        with make():
            fault_dirs[kind] = timed("fault", lambda: train_run(name(FAULT, MID, 0, **{kind: FAULT_AT}),
                                                                **family(MID, 0), collapse_ref=live_ref))
    repeat_dirs = {}   # the shard faults again at two more seeds: is the first alert a one-seed accident?
    for kind in REPEAT:
        with FAULTS[kind][0]():
            for s in SEEDS[1:3]:
                repeat_dirs[kind, s] = timed("fault", lambda: train_run(name(FAULT, MID, s, **{kind: FAULT_AT}),
                                                                        **family(MID, s), collapse_ref=live_ref))
    print(f"trained in {time.time() - t0:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items()), flush=True)

    # ---- curves and CSVs (the analysis reads the CSVs, so `collapse.py analyze` sees exactly these numbers)
    os.makedirs(RESULTS, exist_ok=True)
    curves = lambda dirs: [val_curve(d, TPP, DOMAIN) for d in dirs]
    fam_csv = write_curves_csv(curves(fam_dirs), os.path.join(RESULTS, "collapse_family.csv"))
    ctl_csv = write_curves_csv(curves(ctl_dirs), os.path.join(RESULTS, "collapse_control.csv"))
    cmp_csv = write_curves_csv(curves(cmp_dirs), os.path.join(RESULTS, "collapse_family_lr-6.csv"))
    cmp_ctl_csv = write_curves_csv(curves(cmp_ctl_dirs), os.path.join(RESULTS, "collapse_control_lr-6.csv"))
    fam, ctl, cmp_fam, cmp_ctl = (C.load_curves(f) for f in (fam_csv, ctl_csv, cmp_csv, cmp_ctl_csv))
    for c in fam + ctl + cmp_fam + cmp_ctl:
        c.seed = int(float(c.seed))
    size_of = {w: n_params(w)[1] for w in WIDTHS}
    mid_size = size_of[MID]
    out = {"widths": WIDTHS, "seeds": SEEDS, "control_seeds": CTL_SEEDS, "tpp_nonembedding": TPP, "steps": STEPS,
           "lr": LR, "tau": fam[0].tau,
           "runs": {os.path.relpath(d, RUNS): {k: read_run(d)[0][k] for k in ("N", "D", "steps", "B", "tau",
                                                                              "weight_decay")}
                    for d in fam_dirs + ctl_dirs},
           "final_val": {fn: {c.name: float(c.loss[-1]) for c in cs} for fn, cs in
                         (("family", fam), ("control", ctl), ("family_lr-6", cmp_fam), ("control_lr-6", cmp_ctl))}}

    # ---- Δ vs σ: both normalisations, family and control
    table, arrays = {}, {}
    for fn, cs in (("family", fam), ("control", ctl), ("family_lr-6", cmp_fam), ("control_lr-6", cmp_ctl)):
        for off in ("none", "fit"):
            res, arr = window_stats(cs, off, XS)
            table[f"{fn}_{off}"], arrays[f"{fn}_{off}"] = res, arr
            print(f"{fn:8s} offset={off:4s} L0={res['L0']:.3f}  Δ {np.round(res['delta'], 4)}  "
                  f"σ {np.round(res['sigma'], 4)}  Δ/σ on [{XS[0]}, {XS[1]}]: mean {res['ratio_mean']:.2f} "
                  f"max {res['ratio_max']:.2f}, Δ ≤ σ from x = {res['supercollapse_from_x']:.2f}; "
                  f"ℓ(0.5) by size {res['ell05_by_size']}", flush=True)
    # the family with 3 seeds only (the previous design's count), to see what the extra seeds change
    res3, _ = window_stats([c for c in fam if c.seed < 3], "none", XS)
    table["family_none_3seeds"] = res3
    print(f"family, seeds 0-2 only: Δ/σ mean {res3['ratio_mean']:.2f} max {res3['ratio_max']:.2f}")
    out["collapse"] = table

    # ---- forecasts from the first 30%: reference = the family runs of the other widths (all seeds)
    fc = []
    for c, kind in ([(c, "family") for c in fam] + [(c, "control") for c in ctl]
                    + [(c, "family_lr-6") for c in cmp_fam]):
        refs = [r for r in (cmp_fam if kind == "family_lr-6" else fam) if r.size != c.size]
        row = {"run": c.name, "family": kind, "L1": float(c.loss[-1])}
        for key, shape in (("mean", "curve"), ("trend", "size")):
            row[f"L1_hat_{key}"] = forecast(c, refs, shape)
            row[f"err_{key}"] = row[f"L1_hat_{key}"] / c.loss[-1] - 1
        fc.append(row)
    fsum = {}
    for f in ("family", "control", "family_lr-6"):
        for k in ("err_mean", "err_trend"):
            e = np.abs([r[k] for r in fc if r["family"] == f])
            fsum[f"{f}_{k}"] = {"mean_abs": float(e.mean()), "max_abs": float(e.max())}
            print(f"forecast at {AT:.0%}, {f}, {k}: mean |err| {100 * e.mean():.2f}%, max {100 * e.max():.2f}%")
    out["forecasts"], out["forecast_summary"] = fc, fsum

    # ---- the LR and τ sweeps ranked by forecasts at 30% (reference: the family's other sizes)
    refs = [r for r in fam if r.size != mid_size]
    out["sweeps"] = {}
    for sweep, dirs, label in (("lr", lr_dirs, "log2 η"), ("tau", tau_dirs, "τ/τ_opt")):
        sw = []
        for key, d in sorted(dirs.items()):
            c = val_curve(d, TPP, DOMAIN)
            sw.append({"value": math.log2(key) if sweep == "lr" else key, "L1": float(c.loss[-1]),
                       "L_at30": float(np.interp(AT, c.x, c.loss)),
                       "L1_hat_mean": forecast(c, refs, "curve"), "L1_hat_trend": forecast(c, refs, "size")})
        best = lambda k: min(sw, key=lambda r: r[k])["value"]
        out["sweeps"][sweep] = {"runs": sw, "true_best": best("L1"), "picked_mean": best("L1_hat_mean"),
                                "picked_trend": best("L1_hat_trend"), "picked_naive_at30": best("L_at30")}
        o = out["sweeps"][sweep]
        print(f"{sweep} sweep at d{MID} ({label}): true best {o['true_best']:g}, forecast picks {o['picked_mean']:g} "
              f"(mean ref) / {o['picked_trend']:g} (trend ref), lowest loss at 30%: {o['picked_naive_at30']:g}")
        for r in sw:
            print(f"   {r['value']:g}: final {r['L1']:.4f}, at 30% {r['L_at30']:.4f}, forecast {r['L1_hat_mean']:.4f} "
                  f"(mean) / {r['L1_hat_trend']:.4f} (trend)")

    # ---- the faults: train.py's monitor (collapse.CollapseMonitor) on the validation loss, reference = the family runs
    # of the other widths (all seeds) at the monitored run's N, band from those runs replayed leave-one-size-out; the
    # fault runs ran it live, the healthy twins (the 5 seeds of width MID) and other margins are replays of it
    mon_refs = C.load_curves(live_ref, signal="val")
    twins = [C.load_run(d, "val") for d in fam_dirs if f"_w{MID}_" in d]
    N_mid = twins[0].size
    tw_final = np.array([c.loss[-1] for c in twins])
    out["fault"] = {"width": MID, "N": N_mid, "at": FAULT_AT, "margin": MARGIN, "twins_final_val": tw_final.tolist(),
                    "twins_max_val_rise_after_x": [float(np.max(np.diff(c.loss)[c.x[1:] > FAULT_AT])) for c in twins],
                    "twins_seed_sd_rel": float(tw_final.std(ddof=1) / tw_final.mean()), "faults": {}, "twins": {}}
    fault_curves = {k: C.load_run(d, "val") for k, d in fault_dirs.items()}
    shapes = {"size": N_mid, "mean": None}   # the reference shape at the run's N (train.py's), or the mean shape
    margins = (3.0, 4.0, 5.0)
    for shape, size in shapes.items():
        tw = {m: [monitor(c, mon_refs, size, m) for c in twins] for m in margins}
        out["fault"]["twins"][shape] = {
            "false_alerts": [t["n_alerts"] for t in tw[MARGIN]], "max_residual_over_band": [t["max_ratio"]
                                                                                          for t in tw[MARGIN]],
            "false_alerts_by_margin": {str(m): [t["n_alerts"] for t in tw[m]] for m in margins}}
        print(f"twins ({shape} reference): false alerts by margin 3/4/5 "
              f"{out['fault']['twins'][shape]['false_alerts_by_margin']}, max |residual|/band at margin {MARGIN:g} "
              f"{np.round(out['fault']['twins'][shape]['max_residual_over_band'], 2)}")

    def judge(c, d):
        """A fault run against its twins: final loss, what the raw curves showed, and the monitor's alerts."""
        cfg, lines, _ = read_run(d)
        xt = np.array([l["tokens"] / cfg["D"] for l in lines])
        lt = np.array([l["loss"] for l in lines])
        live = np.array([e.get("collapse_residual", np.nan) for e in read_run(d)[2] if e["step"] > 0])
        o = {"final_val": float(c.loss[-1]), "final_val_excess": float(c.loss[-1] / tw_final.mean() - 1),
             "final_val_excess_over_worst_twin": float(c.loss[-1] / tw_final.max() - 1),
             "max_val_rise_after_fault": float(np.max(np.diff(c.loss)[c.x[1:] > FAULT_AT])),
             # what the raw training loss did at the fault: mean over 5% of the run after it minus 5% before
             "train_loss_jump": float(lt[(xt >= FAULT_AT) & (xt < FAULT_AT + 0.05)].mean()
                                      - lt[(xt >= FAULT_AT - 0.05) & (xt < FAULT_AT)].mean())}
        for shape, size in shapes.items():
            ms = {m: monitor(c, mon_refs, size, m) for m in margins}
            xa = ms[MARGIN]["first_alert"]
            gap = None
            if xa is not None:   # what the raw validation loss showed at the alert: the fault vs its twins
                k = int(np.argmax(c.x >= xa))
                vt = np.array([t.loss[k] for t in twins])
                gap = {"fault": float(c.loss[k]), "twins_min": float(vt.min()), "twins_max": float(vt.max()),
                       "excess_over_twin_mean": float(c.loss[k] / vt.mean() - 1)}
            o[shape] = {"first_alert_x": xa, "n_alerts": ms[MARGIN]["n_alerts"],
                        "max_residual_over_band": ms[MARGIN]["max_ratio"], "val_at_alert": gap,
                        "first_alert_x_by_margin": {str(m): ms[m]["first_alert"] for m in margins}}
        # train.py logged its live residuals: they must be the replay's, to the bit (test_all.py asserts the same)
        o["live_equals_replay"] = bool(np.array_equal(live, monitor(c, mon_refs, N_mid)["smoothed"]))
        return o

    for kind, c in fault_curves.items():
        o = out["fault"]["faults"][kind] = {"kind": FAULTS[kind][1], **judge(c, fault_dirs[kind])}
        print(f"fault {kind} ({o['kind']}): final val {o['final_val']:.4f} vs twins {np.round(tw_final, 4)} "
              f"({100 * o['final_val_excess']:+.2f}%); max val rise {o['max_val_rise_after_fault']:+.4f}; "
              f"train-loss jump {o['train_loss_jump']:+.4f}; first alert by margin 3/4/5: "
              f"{o['size']['first_alert_x_by_margin']} (reference at its N), {o['mean']['first_alert_x_by_margin']} "
              f"(mean shape); live = replay: {o['live_equals_replay']}; raw val at alert {o['size']['val_at_alert']}",
              flush=True)
    out["fault"]["repeats"] = {}
    for (kind, s), d in repeat_dirs.items():
        o = out["fault"]["repeats"][f"{kind}_s{s}"] = {"twin_final_val": float(twins[SEEDS.index(s)].loss[-1]),
                                                       **judge(C.load_run(d, "val"), d)}
        print(f"fault {kind}, seed {s}: final val {o['final_val']:.4f} (its twin {o['twin_final_val']:.4f}; "
              f"{100 * o['final_val_excess']:+.2f}% vs the twins' mean); first alert by margin 3/4/5 "
              f"{o['size']['first_alert_x_by_margin']}; live = replay: {o['live_equals_replay']}", flush=True)

    # ---- plots
    P = plt()
    fig, axes = P.subplots(2, 3, figsize=(16, 8.5))
    for row, (fn, cs) in enumerate((("family", fam), ("control", ctl))):
        grid, L, ell, delta, sigma = arrays[f"{fn}_none"]
        _, _, _, delta_f, sigma_f = arrays[f"{fn}_fit"]
        for i, c in enumerate(cs):
            col = f"C{[size_of[w] for w in WIDTHS].index(c.size)}"
            lab = f"d{WIDTHS[[size_of[w] for w in WIDTHS].index(c.size)]}" if c.seed == 0 else None
            axes[row, 0].plot(grid, L[i], color=col, lw=0.7, label=lab)
            axes[row, 1].plot(grid, ell[i], color=col, lw=0.7)
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_title(f"{fn}: validation loss" + (", d2z" if fn == "family" else ", constant LR"))
        axes[row, 0].legend(fontsize=7)
        axes[row, 1].set_title("ℓ = L/L(1)")
        axes[row, 1].set_ylim(0.99, 1.35)
        axes[row, 2].semilogy(grid[:-1], delta[:-1], "C1", label="Δ(x), L/L(1)")
        axes[row, 2].semilogy(grid[:-1], sigma[:-1], "C1--", label="σ(x), L/L(1)")
        axes[row, 2].semilogy(grid[:-1], delta_f[:-1], "C0", lw=0.7,
                              label=f"Δ(x), L0 fitted ({table[fn + '_fit']['L0']:.2f})")
        axes[row, 2].semilogy(grid[:-1], sigma_f[:-1], "C0--", lw=0.7, label="σ(x), L0 fitted")
        axes[row, 2].axvspan(*XS, color="gray", alpha=0.1)
        axes[row, 2].legend(fontsize=7)
        axes[row, 2].set_title(f"{fn}: Δ vs seed floor σ")
    for a in axes.flat:
        a.set_xlabel("x = tokens / D")
    savefig(fig, "collapse_family")

    fig, axes = P.subplots(1, 2, figsize=(13, 4.5))
    for i, c in enumerate(twins):
        axes[0].plot(c.x, c.loss, color="gray", lw=0.8, label=f"healthy twins ({len(twins)} seeds)" if i == 0 else None)
    tw = [monitor(c, mon_refs, N_mid) for c in twins]
    axes[1].plot(twins[0].x, tw[0]["band"], "k:", label=f"band ({MARGIN:g} × rms of the reference sizes' replays)")
    axes[1].plot(twins[0].x, -tw[0]["band"], "k:")
    for i, (c, m) in enumerate(zip(twins, tw)):
        axes[1].plot(c.x, m["smoothed"], color="gray", lw=0.8, label="twins" if i == 0 else None)
    colors = ["C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9", "C0"]   # not C7: the twins are gray
    for j, (kind, c) in enumerate(fault_curves.items()):
        axes[0].plot(c.x, c.loss, color=colors[j], lw=0.9, label=f"fault: {FAULTS[kind][1]}")
        fa = out["fault"]["faults"][kind]["size"]["first_alert_x"]
        axes[1].plot(c.x, monitor(c, mon_refs, N_mid)["smoothed"], color=colors[j], lw=1,
                     label=f"{kind}: first alert x = {fa:.2f}" if fa else f"{kind}: no alert")
    lo = min(c.loss[-1] for c in twins)
    axes[0].set_ylim(lo * 0.98, lo * 1.25)
    axes[0].set_title(f"raw validation loss, d{MID}")
    axes[0].legend(fontsize=7)
    axes[1].axvline(FAULT_AT, color="k", ls="--", lw=0.6)
    axes[1].set_title("train.py's monitor: residual against the other sizes' shape at this N")
    axes[1].legend(fontsize=7)
    for a in axes:
        a.set_xlabel("x = tokens / D")
    savefig(fig, "collapse_monitor")

    out["wall_s"] = {**walls, "total": time.time() - t0}
    save_json("collapse_family", out)
    print(f"done in {time.time() - t0:.0f}s")
