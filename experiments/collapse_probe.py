"""
Experiment 3, probes: one seed of the width family per recipe variant, to find a recipe whose normalised curves
ℓ = L/L(1) do not drift with size (Δ(x) of Qiu et al. 2025, arXiv 2507.02119, without the seed floor σ, which needs
seeds). Prints, per variant, Δ at x = 0.5 / 0.75 / 0.9, Δ's mean over x ∈ [0.5, 0.95] and ℓ(0.5) by width;
writes results/collapse_probe.json and results/collapse_probe_VARIANT.csv. Batches in whole sequences of 128
(recipe_flags(quantum=128)), so that every size takes 417 steps within ±6% ("base" is the previous design so
quantised). The first four variants run (base, nonemb, lr-4, bopt) were trained before recipe_flags rounded large
batches to multiples of up to 8 sequences: a rerun from scratch gives them step counts that differ by up to 5%.
Resumable; each variant ≈ 1-4 min of one core (TPP ∝ N: 5 min; "depth", widths 16-48 at depths 2-6: 9 min).

The variants in SEEDED (the width-and-depth family at η = 2^-7 and its constant-LR control) train every seed and
also report Δ/σ with Qiu et al.'s seed floor σ; their summary row is seed 0's.

    python experiments/collapse_probe.py [VARIANT ...]      # default: every variant below
"""
import json
import os
import sys

import numpy as np

from common import (RESULTS, n_params, recipe_flags, save_json, train_run, val_curve, window_stats,  # noqa: I001
                    write_curves_csv)
import collapse as C
import mup

WIDTHS = [16, 24, 32, 48, 64]
XS = (0.5, 0.95)


def steps_pow(p, w, nonemb=False, s16=417):
    """Steps ∝ D^p anchored at s16 steps at d = 16 (p = 0: equal steps; p = 1 − 0.383: Power Lines' B_opt ∝ D^0.383,
    arXiv 2505.13738; p = 1: a fixed batch); D ∝ N (non-embedding if nonemb) or N + embedding."""
    k = 0 if nonemb else 1
    return s16 * (n_params(w)[k] / n_params(16)[k]) ** p


def flags(v, w, seed=0):
    """train.py flags of variant v at width w. Every variant: CompleteP, d2z, 10% warm-up, τ = τ_opt(TPP),
    validation on 8 fixed windows ≈50 times (common.recipe_flags) unless it says otherwise."""
    tpp0 = 100.0 if "tpp100" in v else 40.0   # 100: experiment 4's compute-optimal TPP
    tpp, lr, steps, extra = tpp0, 2 ** -6, 417, {}
    L = w // 8 if "depth" in v.split("_") else 2   # width and depth together, d/L = 8 (Celerity; CompleteP, L_base 2)
    n, n_tot = n_params(w, L)
    if "nonemb" in v:       # TPP counted on non-embedding N (D = TPP·N): the small models get fewer tokens
        tpp = tpp0 * n / n_tot
    if "tppN" in v:                 # TPP ∝ N^γ around 40 at d32: γ = α/β − 1 = 0.40, the compute-optimal tilt of
        g = float(v.split("tppN")[1]) / 10   # experiment 4's Chinchilla fit on non-embedding N (α 0.299, β 0.213)
        k = 0 if "nonemb" in v else 1
        tpp *= (n_params(w)[k] / n_params(32)[k]) ** g
    if "lr-4" in v.split("_"):
        lr = 2 ** -4
    if "lr-5" in v.split("_"):
        lr = 2 ** -5
    if "lr-6.5" in v.split("_"):
        lr = 2 ** -6.5
    if "lr-7" in v.split("_"):
        lr = 2 ** -7
    if "bopt" in v.split("_"):        # steps ∝ D^0.617, i.e. B ∝ D^0.383
        steps = steps_pow(1 - 0.383, w, "nonemb" in v)
    if v == "stepsdown":           # steps ∝ D^-0.3 (the batch grows faster than D): the other side of equal steps
        steps = steps_pow(-0.3, w)
    if "code" in v:                 # Python code (stdlib, 11.3M tokens): no run repeats its data (prose: 1.7M)
        extra["data"] = "stdlib"
    if "noclip" in v:               # no gradient clipping (train.py's default clips at 1.0; the norms cross 1 late)
        extra["grad_clip"] = 0
    if "hd8" in v.split("_"):                  # head_dim 8 at every width (d16: 2 heads ... d64: 8 heads)
        extra["n_head"] = w // 8
    if "const" in v.split("_"):                # constant LR after the warm-up: the control (Qiu et al.)
        extra["schedule"] = "constant"
    f = recipe_flags(w, seed, tpp, lr=lr, steps=steps, quantum=128, n_layer=L, **extra)
    f["tau"] = f"{mup.tau_opt(tpp0):.6g}"  # τ_opt of the nominal TPP, at every size
    return f


VARIANTS = ["base", "nonemb", "lr-4", "bopt", "nonemb_bopt", "hd8", "nonemb_lr-4", "stepsdown", "tpp100", "lr-5",
            "nonemb_lr-5", "lr-7", "nonemb_lr-7", "code", "nonemb_code", "nonemb_tppN04", "nonemb_tppN10", "noclip",
            "nonemb_noclip", "nonemb_code_lr-7", "nonemb_code_lr-6.5",
            "nonemb_code_lr-6.5_tpp100", "nonemb_code_lr-6.5_depth", "nonemb_code_lr-7_depth"]
SEEDED = {"nonemb_code_lr-7_depth": [0, 1, 2, 3, 4], "nonemb_code_lr-7_depth_const": [0, 1, 2]}  # a family, a control


def probe(v, seeds=(0,)):
    """Train variant v (every width, each seed), write its curves; the summary is seed 0's, plus Δ/σ with seeds."""
    # depth: d16-48 at L = 2-6 (N 6.6k-170k non-embedding); d64 at L = 8 would read 16M tokens, more than stdlib has
    widths = WIDTHS[:4] if "depth" in v else WIDTHS
    dirs = [train_run(f"collapse_probe3/{v}_w{w}_s{s}", **flags(v, w, s)) for s in seeds for w in widths]
    cs = [val_curve(d, 40.0, "stdlib" if "code" in v else "prose") for d in dirs]
    os.makedirs(RESULTS, exist_ok=True)
    write_curves_csv(cs, os.path.join(RESULTS, f"collapse_probe_{v}.csv"))
    res = summary(cs[:len(widths)])
    if len(seeds) > 1:   # Qiu's σ(x) from the seeds: the supercollapse test of experiment 3, on this family
        st, _ = window_stats(cs, "none", XS)
        res.update(seeds=list(seeds), delta_at_seeds=st["delta_at"],
                   **{k: st[k] for k in ("ratio_mean", "ratio_max", "supercollapse_from_x", "sigma_at")})
    return res


def summary(cs):
    grid, L, ell, _ = C.normalise(cs, "none", 1)
    delta = ell.std(0, ddof=1) / ell.mean(0)
    sel = (grid >= XS[0]) & (grid <= XS[1])
    at = lambda a, x: float(np.interp(x, grid, a))
    return {"delta_at": {x: at(delta, x) for x in (0.5, 0.75, 0.9)}, "delta_mean": float(delta[sel].mean()),
            "ell05": [at(e, 0.5) for e in ell], "final": [float(l[-1]) for l in L],
            "slope_ell05_per_lnN": float(np.polyfit(np.log([c.size for c in cs]), [at(e, 0.5) for e in ell], 1)[0])}


if __name__ == "__main__":
    todo = sys.argv[1:] or VARIANTS
    path = os.path.join(RESULTS, "collapse_probe.json")
    out = json.load(open(path)) if os.path.exists(path) else {}
    base = C.load_curves(os.path.join(RESULTS, "collapse_family_v2.csv"))   # the previous design, seed 0
    out["v2_base"] = summary([c for c in base if float(c.seed) == 0])
    for v in todo:
        out[v] = probe(v, SEEDED.get(v, (0,)))
        save_json("collapse_probe", out)
    for v, r in out.items():
        print(f"{v:14s} Δ(0.5/0.75/0.9) {[round(d, 4) for d in r['delta_at'].values()]} mean {r['delta_mean']:.4f}"
              f"  ℓ(0.5) {[round(e, 3) for e in r['ell05']]} slope/lnN {r['slope_ell05_per_lnN']:+.4f}"
              f"  final {[round(f, 3) for f in r['final']]}" + (f"  seeds {r['seeds']}: Δ/σ on {XS} mean "
                                                                 f"{r['ratio_mean']:.2f} max {r['ratio_max']:.2f}, "
                                                                 f"Δ ≤ σ from x = {r['supercollapse_from_x']:.2f}"
                                                                 if "seeds" in r else ""), flush=True)
