"""
Benchmarks: one function per measurement ("section"), each returning a flat dict of results.

    python bench.py                    # every section
    python bench.py --only=scaling     # a comma-separated list of sections
    python bench.py --json             # one JSON object keyed by section

To add a section, write `def bench_<name>()` returning {key: number or text} and add it to SECTIONS.
The dev machine is shared, so sections time each thing more than once and report the best.
"""
import json
import sys
import time


def best_time(fn, repeats):
    """Best wall time of `repeats` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_scaling(points=240, scipy_starts=300, repeats=2, seed=0):
    """Chinchilla Approach 3 on synthetic data: scaling.fit_law's batched L-BFGS over the full
    4,500-start grid (SPEC §5) against SciPy's L-BFGS-B looped over the same starts, the reference.
    SciPy is timed on a random subset of the starts and extrapolated linearly to all of them."""
    import itertools
    import math
    import numpy as np
    from scipy.optimize import minimize
    import scaling

    # N over 70M-16B params, 2-300 tokens per param, Besiroglu et al. 2024's fit, 1% log-normal noise
    rng = np.random.default_rng(seed)
    truth = dict(E=1.817, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
    N = np.exp(rng.uniform(math.log(7e7), math.log(1.6e10), points))
    D = N * np.exp(rng.uniform(math.log(2), math.log(300), points))
    L = scaling.Fit("chinchilla", truth, 0, 0).predict(N=N, D=D) * np.exp(0.01 * rng.standard_normal(points))

    t_batched, fit = best_time(lambda: scaling.fit_law("chinchilla", dict(N=N, D=D), L), repeats)

    # reference: the same objective (summed Huber on log residuals) in numpy with its exact gradient
    lN, lD, lL, d = np.log(N), np.log(D), np.log(L), scaling.DELTA
    def objective(th):
        e, a, b, alpha, beta = th
        t = np.stack([np.full_like(lN, e), a - alpha * lN, b - beta * lD])
        w = np.exp(t - t.max(0))
        r = t.max(0) + np.log(w.sum(0)) - lL
        p, dr = w / w.sum(0), np.clip(r, -d, d)
        h = np.where(np.abs(r) <= d, 0.5 * r * r, d * (np.abs(r) - 0.5 * d)).sum()
        return h, np.array([dr @ p[0], dr @ p[1], dr @ p[2], -(dr * p[1]) @ lN, -(dr * p[2]) @ lD])
    grid = scaling.LAWS["chinchilla"].grid
    starts = np.array(list(itertools.product(*(grid[k] for k in ("log_E", "log_A", "log_B", "alpha", "beta")))))
    subset = starts[rng.choice(len(starts), scipy_starts, replace=False)]
    t_sub, results = best_time(lambda: [minimize(objective, s, jac=True, method="L-BFGS-B") for s in subset], 1)
    t_scipy = t_sub * len(starts) / scipy_starts
    ref = min(results, key=lambda r: r.fun)
    ref_params = dict(E=math.exp(ref.x[0]), A=math.exp(ref.x[1]), B=math.exp(ref.x[2]), alpha=ref.x[3], beta=ref.x[4])
    diff = max(abs(fit.params[k] / v - 1) for k, v in ref_params.items())
    return {
        "points": points, "starts": len(starts),
        "batched_fit_s": round(t_batched, 2),
        "scipy_loop_s": round(t_scipy, 1),
        "scipy_note": f"timed on {scipy_starts} random starts, x{len(starts) / scipy_starts:.0f} linearly",
        "speedup": round(t_scipy / t_batched, 1),
        "batched_loss": fit.loss, "scipy_loss": float(ref.fun),
        "max_param_rel_diff": float(f"{diff:.2g}"),
        "same_optimum": bool(diff < 1e-3 and fit.loss <= ref.fun * (1 + 1e-6)),
        **{f"fit_{k}": round(v, 4) for k, v in fit.params.items()},
    }


SECTIONS = {"scaling": bench_scaling}


if __name__ == "__main__":
    only, as_json = list(SECTIONS), False
    for arg in sys.argv[1:]:
        key, _, val = arg.lstrip("-").partition("=")
        if arg.startswith("--only=") and all(v in SECTIONS for v in val.split(",")):
            only = val.split(",")
        elif arg == "--json":
            as_json = True
        else:
            print(f"error: bad argument {arg!r}; valid: --only=<{','.join(SECTIONS)}> and --json", file=sys.stderr)
            sys.exit(2)
    results = {}
    for name in only:
        results[name] = SECTIONS[name]()
        if not as_json:
            print(f"== {name}")
            for k, v in results[name].items():
                print(f"  {k:<20} {v}")
    if as_json:
        print(json.dumps(results))
