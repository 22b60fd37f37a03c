"""
Loss-curve collapse (Bergsma et al. 2025, arXiv 2509.25087; Qiu et al. 2025, arXiv 2507.02119): the AdamW
timescale recipe, normalised loss curves, the collapse deviation Δ against the seed noise floor σ, final-loss
forecasts from partial runs, and a live monitor. Stands alone (numpy, and mup.py's recipe and LR schedule); reads
run directories (config.json + log.jsonl) and long CSV.

    python collapse.py recipe --params=1e6 --tpp=20
    python collapse.py analyze --runs=out/fam/* --json --plot=collapse.png
    python collapse.py forecast --runs=out/sweep/* --ref=out/fam/s1 --at=0.3
    python collapse.py synth --out=fam.csv --tau=0.2    # a synthetic family to try the tools on
"""
import csv
import glob
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from configurator import ArgumentParser, atomic, save_figure
from mup import MupError, batch_opt, lr_factor, tau, tau_opt, weight_decay_for_tau  # the training side of the recipe

X_REPORT = [0.25, 0.5, 0.75, 0.9]  # where Δ and σ are reported
COMPLETE = 0.99  # a curve whose last x is below this is a partial run


class CollapseError(Exception):
    """A problem with the user's input, reported as one sentence."""

# -----------------------------------------------------------------------------
# recipes: AdamW timescale and Power Lines (Bergsma et al. 2025, arXiv 2505.13738)

def recipe(params, tpp, lr=1.2e-2, seq_len=2048):
    """A compute-efficient run: D = TPP·N, B = B_opt(D) in whole sequences, D/B steps, λ hitting τ_opt(TPP).
    τ is every decayed group's timescale as train.py's --tau sets it: λ is the base λ (embedding) at the base
    peak LR η, and the hidden matrices, at η/m_N under µP and CompleteP, get λ·m_N, so their τ is the same."""
    if params <= 0 or tpp <= 0 or lr <= 0 or seq_len <= 0:
        raise CollapseError(f"recipe needs positive params, tpp, lr and seq_len (got {params}, {tpp}, {lr}, {seq_len})")
    B_seqs = max(1, round(batch_opt(tpp * params, in_tokens=True) / seq_len))
    B = B_seqs * seq_len
    steps = max(1, round(tpp * params / B))
    D = steps * B
    wd = weight_decay_for_tau(tau_opt(tpp), lr, B, D)
    return {"N": int(params), "TPP": D / params, "D": D, "B_seqs": B_seqs, "B": B, "seq_len": seq_len, "steps": steps,
            "lr": lr, "weight_decay": wd, "tau": tau(lr, wd, B, D)}

# -----------------------------------------------------------------------------
# LR schedules η(x) relative to the peak, and a synthetic family to test the tools on

def lr_shape(x, schedule, warmup=0.0, final_lr_frac=0.0085, wsd_decay=0.2, steps=10 ** 6):
    """η(x): train.py's LR schedule (mup.lr_factor) as a fraction of the peak at run fraction x of `steps`."""
    try:
        return lr_factor(np.asarray(x, float) * steps, steps, schedule, warmup, final_lr_frac, wsd_decay)
    except MupError as e:
        raise CollapseError(str(e)) from None


def nq_variance(x, tau, schedule="d2z", warmup=0.05, kappa=1.0):
    """Noisy-quadratic variance v(x), in units of its constant-LR stationary value: dv/dx = (2η/τ)(η − v), v(0) = κ,
    relaxing towards η(x) at the AdamW rate 2η(x)/τ; with η ≡ 1 it is the constant-LR closed form
    (1 − e^(−2x/τ)) + κ·e^(−2x/τ) (docs/science.md §7).
    Solved exactly on a fine grid: v = e^−A·(κ + ∫(2η²/τ)e^A), A = (2/τ)∫η."""
    f = np.linspace(0.0, 1.0, 20001)
    eta = lr_shape(f, schedule, warmup)
    cum = lambda g: np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(f))])
    A = cum(2 * eta / tau)
    return np.interp(x, f, np.exp(-A) * (kappa + cum(2 * eta ** 2 / tau * np.exp(A))))


def nq_shape(x, tau, schedule="d2z", warmup=0.05):
    """Synthetic normalised curve: a power-law progress term (x + 0.02)^−0.1 plus 0.5·v(x), over its x = 1 value."""
    u = lambda x: (np.asarray(x, float) + 0.02) ** -0.1 + 0.5 * nq_variance(x, tau, schedule, warmup)
    return u(x) / u(1.0)


@dataclass
class Curve:
    """One run's loss against x = fraction of the run, plus what collapse needs to know about it."""
    name: str
    x: np.ndarray
    loss: np.ndarray
    size: float = None       # N (or the CSV's size column); runs of one size are seeds
    seed: object = None
    schedule: str = None
    tpp: float = None
    tau: float = None
    warmup: float = 0.0
    eta: np.ndarray = None   # logged LR / peak LR at each x, when known
    lr_args: dict = None     # final_lr_frac, wsd_decay and steps of the run's schedule, from its config.json


def synthetic(sizes, tau=0.2, seeds=1, schedule="d2z", warmup=0.05, L0=0.0, noise=0.0, seed_sd=0.0,
              points=200, rng=0):
    """A family L = L0 + a·N^−0.3·(1+ε_seed)·ℓ(x)·(1 + noise·z): one τ ⇒ an exact collapse (under L/L(1)
    when L0 = 0, under (L−L0)/(L(1)−L0) otherwise); ε_seed ~ N(0, seed_sd) is the seed-to-seed spread."""
    gen = np.random.default_rng(rng)
    x = np.arange(1, points + 1) / points
    ell = nq_shape(x, tau, schedule, warmup)
    out = []
    for N in sizes:
        for s in range(seeds):
            amp = 30.0 * N ** -0.3 * (1 + seed_sd * gen.standard_normal())
            loss = L0 + amp * ell * (1 + noise * gen.standard_normal(points))
            out.append(Curve(f"N{N:g}_tau{tau:g}_s{s}", x.copy(), loss, float(N), s, schedule, 20.0, tau, warmup,
                             lr_shape(x, schedule, warmup)))
    return out

# -----------------------------------------------------------------------------
# reading curves: run directories and long CSV

def _checked(c, where, hint=""):
    lr = c.eta  # the loaders pass the logged LR; η = LR / peak LR, only when every point has one
    c.eta = lr / lr.max() if len(lr) and np.all(np.isfinite(lr)) and lr.max() > 0 else None
    if not (np.all(np.isfinite(c.x)) and np.all(np.isfinite(c.loss))):
        raise CollapseError(f"{where}: run {c.name!r} has a missing, NaN or infinite x or loss")
    if c.size is not None and not (math.isfinite(c.size) and c.size > 0):
        raise CollapseError(f"{where}: run {c.name!r} has size {c.size}; a size must be a positive parameter count")
    if np.any(np.diff(c.x) <= 0):
        i = int(np.argmax(np.diff(c.x) <= 0)) + 1
        raise CollapseError(f"{where}: run {c.name!r} has non-increasing x at point {i + 1} "
                            f"({c.x[i - 1]:g} then {c.x[i]:g})")
    keep = c.x > 0  # points before any training (x = 0) are not part of the curve on (0, 1]
    c.x, c.loss, c.eta = c.x[keep], c.loss[keep], None if c.eta is None else c.eta[keep]
    if len(c.x) < 3:
        raise CollapseError(f"{where}: run {c.name!r} has {len(c.x)} points with x > 0; a curve needs at least 3"
                            + hint)
    return c


def load_run(path, signal="train"):
    """A run directory: config.json (N, D, seed, schedule, TPP, tau, warmup) and log.jsonl's training loss (signal
    "train"), or its validation loss on the first --data domain at every evaluation (signal "val": the same fixed
    windows for every run, so seeds differ by their models alone, not by their batches)."""
    if signal not in ("train", "val"):
        raise CollapseError(f"signal {signal!r} must be 'train' (training loss) or 'val' (validation loss)")
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(path, "log.jsonl")) as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    except (OSError, ValueError) as e:
        raise CollapseError(f"{path}: config.json or log.jsonl cannot be read ({e})")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("D"), (int, float)) or cfg["D"] <= 0:
        raise CollapseError(f"{path}/config.json has no positive total token count 'D'")
    rows = []
    for i, line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict):
            raise CollapseError(f"{path}/log.jsonl line {i} is not a JSON object")
        if signal == "train" and "loss" in r:  # training lines carry "loss", evaluation lines "val"
            rows.append(r)
        elif signal == "val" and "val" in r:
            if not (isinstance(r["val"], dict) and r["val"]):
                raise CollapseError(f"{path}/log.jsonl line {i}: 'val' is not an object of per-domain losses")
            rows.append({**r, "loss": next(iter(r["val"].values()))})
    num = lambda k: np.array([r[k] if isinstance(r.get(k), (int, float)) else np.nan for r in rows], float)
    return _checked(Curve(os.path.basename(os.path.normpath(path)), num("tokens") / cfg["D"], num("loss"),
                          cfg.get("N"), cfg.get("seed"), cfg.get("schedule"), cfg.get("TPP"), cfg.get("tau"),
                          cfg.get("warmup") or 0.0, num("lr"),
                          {k: cfg[k] for k in ("final_lr_frac", "wsd_decay") if isinstance(cfg.get(k), (int, float))}
                          | ({"steps": cfg["steps"]}
                             if isinstance(cfg.get("steps"), int) and cfg["steps"] > 0 else {})),
                    path, " (its evaluations: a smaller --eval_interval gives more)" if signal == "val" else "")


def load_csv(path, x=None, size_col=None, seed_col=None):
    """Long CSV: columns run, x (step, tokens or compute), loss; optional size, seed, schedule, tpp, tau, lr.
    x is divided by each run's last value, so every run in a CSV is taken to be complete."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CollapseError(f"{path} cannot be read as CSV ({e})")
    if not rows:
        raise CollapseError(f"{path} has no data rows (it is empty or holds only a header)")
    cols = list(rows[0])
    x = x or next((k for k in ("tokens", "compute", "step") if k in cols), "step")  # --x= overrides
    for col in ("run", x, "loss", size_col, seed_col):
        if col and col not in cols:
            raise CollapseError(f"{path} has no column {col!r} (columns: {', '.join(cols)})")
    size_col = size_col or ("size" if "size" in cols else None)
    seed_col = seed_col or ("seed" if "seed" in cols else None)
    def num(i, r, k):  # a number; None where an optional column is absent or empty
        try:
            return float(r[k]) if k and r.get(k) not in (None, "") else None
        except ValueError:
            raise CollapseError(f"{path} line {i}: column {k!r} must be a number (got {r[k]!r})")
    runs = {}
    for i, r in enumerate(rows, 2):
        runs.setdefault(r["run"], []).append((i, r))
    curves = []
    for name, rs in runs.items():
        xs, loss, lr = (np.array([num(i, r, k) for i, r in rs], float) for k in (x, "loss", "lr"))
        if xs[-1] <= 0:
            raise CollapseError(f"{path}: run {name!r} ends at {x} = {xs[-1]:g}; x must end above 0")
        i, r = rs[0]
        c = Curve(name, xs / xs[-1], loss, num(i, r, size_col), r.get(seed_col) if seed_col else None,
                  r.get("schedule") or None, num(i, r, "tpp"), num(i, r, "tau"), 0.0, lr)
        curves.append(_checked(c, path))
    return curves


def load_curves(spec, x=None, size_col=None, seed_col=None, signal="train"):
    """Comma-separated run directories, CSV files and glob patterns (a folder of run directories counts too);
    signal: which loss of a run directory (load_run)."""
    curves = []
    for item in [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s]:
        paths = sorted(glob.glob(item)) if any(ch in item for ch in "*?[") else [item]
        if not paths:
            raise CollapseError(f"--runs pattern {item!r} matches nothing")
        for p in paths:
            inside = sorted(glob.glob(os.path.join(p, "*", "config.json")))  # a folder of run directories
            if os.path.isfile(os.path.join(p, "config.json")):
                curves.append(load_run(p, signal))
            elif inside:
                curves += [load_run(os.path.dirname(q), signal) for q in inside]
            elif os.path.isfile(p):
                curves += load_csv(p, x, size_col, seed_col)
            elif not os.path.exists(p):
                raise CollapseError(f"{p} does not exist")
            else:
                raise CollapseError(f"{p} is neither a run directory (with config.json) nor a CSV file")
    if not curves:
        raise CollapseError(f"no runs found in {spec!r}")
    return curves


def check_mixing(curves, force=False):
    """Collapse needs one schedule and one TPP (Bergsma et al. 2025, §3); refuse mixtures unless forced."""
    if force:
        return
    sched = {c.schedule for c in curves if c.schedule}
    if len(sched) > 1:
        raise CollapseError(f"the runs mix LR schedules ({', '.join(sorted(sched))}); collapse needs one schedule "
                            "(--force to compare anyway)")
    tpps = [c.tpp for c in curves if c.tpp]
    if tpps and max(tpps) > 1.01 * min(tpps):
        raise CollapseError(f"the runs mix tokens per parameter ({min(tpps):g} to {max(tpps):g}); collapse needs "
                            "one TPP (--force to compare anyway)")

# -----------------------------------------------------------------------------
# normalisation and the collapse statistics

def smooth(x, y, window):
    """Moving average over `window` points; near the ends, where a centred window does not fit, the value of a
    least-squares line through the nearest `window` points (so a trending loss is not biased at x = 1)."""
    n, w = len(y), min(int(window), len(y))
    if w <= 1:
        return np.asarray(y, float).copy()
    lo = np.clip(np.arange(n) - w // 2, 0, n - w)
    hi = lo + w
    cs = lambda v: np.concatenate([[0.0], np.cumsum(v)])
    S = lambda v: cs(v)[hi] - cs(v)[lo]
    Sx, Sy, Sxx, Sxy = S(x), S(y), S(x * x), S(x * y)
    den = w * Sxx - Sx ** 2
    slope = np.where(den > 0, (w * Sxy - Sx * Sy) / np.where(den > 0, den, 1), 0.0)
    return (Sy + slope * (w * x - Sx)) / w


def fit_offset(sizes, finals):
    """Qiu et al.'s irreducible loss: fit L(1) = L0 + a·S^(−b) to the final losses (S = size, per-size means).
    For fixed b the fit is linear in (L0, a); b is found by a scan then golden-section search."""
    S = np.array(sorted(set(sizes)), float)
    if len(S) < 3:
        raise CollapseError(f"--offset=fit needs at least 3 distinct sizes, got {len(S)}")
    L = np.array([np.mean([f for s, f in zip(sizes, finals) if s == v]) for v in S])
    s = S / np.exp(np.mean(np.log(S)))  # scale sizes near 1 so S^-b stays well conditioned
    lowest = float(np.min(finals))  # below every run's final loss, not only every size's mean (normalise needs it)
    def sse(b):  # least squares in (L0, a) for this b, with L0 kept in [0, min L): a loss floor cannot be negative
        x = s ** -b
        L0 = np.linalg.lstsq(np.stack([np.ones_like(s), x], 1), L, rcond=None)[0][0]
        L0 = min(max(L0, 0.0), 0.999 * lowest)
        a = float((L - L0) @ x / (x @ x))
        return float(np.sum((L0 + a * x - L) ** 2)), (L0, a)
    bs = np.linspace(0.005, 3.0, 600)
    k = int(np.argmin([sse(b)[0] for b in bs]))
    lo, hi = bs[max(k - 1, 0)], bs[min(k + 1, len(bs) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, m2) if sse(m1)[0] < sse(m2)[0] else (m1, hi)
    return float(sse((lo + hi) / 2)[1][0])


def normalise(curves, offset="none", window=1, grid=None):
    """Put complete curves on a common grid x ∈ (0, 1]. offset "none": Bergsma's ℓ = L/L(1); a number or "fit":
    Qiu's ℓ = (L − L0)/(L(1) − L0). Returns grid, L (runs × grid, smoothed), ℓ and L0."""
    for c in curves:
        if c.x[-1] < COMPLETE:
            raise CollapseError(f"run {c.name!r} ends at x = {c.x[-1]:.3g}; normalising needs complete runs")
    if grid is None:
        grid = np.linspace(max(c.x[0] for c in curves), 1.0, 400)
    L = np.stack([np.interp(grid, c.x, smooth(c.x, c.loss, window)) for c in curves])
    if offset in ("none", None):
        return grid, L, L / L[:, -1:], 0.0
    if offset == "fit":
        if any(c.size is None for c in curves):
            raise CollapseError("--offset=fit needs a size for every run (config 'N' or the CSV's size column)")
        L0 = fit_offset([c.size for c in curves], list(L[:, -1]))
    else:
        try:
            L0 = float(offset)
        except ValueError:
            raise CollapseError(f"--offset={offset} must be none, fit or a number")
    bad = [c.name for c, l1 in zip(curves, L[:, -1]) if l1 <= L0]
    if bad:
        raise CollapseError(f"offset L0 = {L0:.4g} is not below the final loss of run {bad[0]!r}")
    return grid, L, (L - L0) / (L[:, -1:] - L0), L0


def collapse_stats(curves, L, ell, L0):
    """Qiu et al.: Δ(x) = std over all runs of ℓ / its mean; σ(x) = per-size std over seeds of L − L0 / its mean,
    averaged over the sizes that have seeds (None if none has). Sample std (ddof = 1) for both."""
    delta = ell.std(0, ddof=1) / ell.mean(0)
    groups = {}  # seeds: runs of one size and one τ (to 3 digits: τ is recomputed from rounded settings)
    for i, c in enumerate(curves):
        if c.size is not None:
            groups.setdefault((c.size, None if c.tau is None else float(f"{c.tau:.3g}")), []).append(i)
    per_size = [(L[g] - L0).std(0, ddof=1) / (L[g] - L0).mean(0) for g in groups.values() if len(g) > 1]
    return delta, (np.mean(per_size, 0) if per_size else None)

# -----------------------------------------------------------------------------
# forecasting the final loss from a partial run

def forecast(prefix_x, prefix_loss, reference, x_min=0.05, window=1):
    """Choose L(1) so that L(1)·ℓ_ref(x) best matches the (smoothed) prefix: least squares in log space over
    the prefix points with x ≥ x_min (all points if fewer than 3 qualify); closed form, the mean log-ratio."""
    x, y = np.asarray(prefix_x, float), smooth(np.asarray(prefix_x, float), np.asarray(prefix_loss, float), window)
    sel = x >= x_min if np.sum(x >= x_min) >= 3 else np.ones_like(x, bool)
    ref = reference(x[sel]) if callable(reference) else np.interp(x[sel], *reference)
    return float(np.exp(np.mean(np.log(y[sel]) - np.log(ref))))


def size_shape(ells, sizes, N):
    """ℓ_ref(x; N) = a(x) + b(x)·log N: reference curves ℓ (runs × grid) regressed on log size at every x, at size N
    (ours: a small family's normalised curves still drift a little with size, and its mean shape then fits none of its
    sizes; experiments/REPORT.md §3). References of one size give their mean curve."""
    sizes = np.asarray(sizes, float)
    if np.ptp(sizes) == 0:
        return ells.mean(0)
    coef = np.linalg.lstsq(np.stack([np.ones(len(sizes)), np.log(sizes)], 1), ells, rcond=None)[0]
    return coef[0] + coef[1] * math.log(N)


def eq4(x, e, b, q):
    """Bergsma et al. 2025, Eq. 4 before normalisation: ((1+ε1)/(x+ε1))^m + b·(η+ε2)^q, η = relative LR at x."""
    eps1, eps2, m = 1e-3, 0.1, 0.05  # the paper's constants (Bergsma et al. 2025, Eq. 4)
    return ((1 + eps1) / (x + eps1)) ** m + b * (e + eps2) ** q


def eta_of(c):
    """η(x) of a run: its logged LR when the run is complete, else its schedule's formula."""
    if c.eta is not None and c.x[-1] >= COMPLETE:
        return lambda x: np.interp(x, c.x, c.eta)
    if c.schedule:
        return lambda x: lr_shape(x, c.schedule, c.warmup, **(c.lr_args or {}))
    raise CollapseError(f"run {c.name!r} has neither a logged LR nor a schedule; the parametric shape needs η(x)")


def _levenberg_marquardt(res, p0, iters=200):
    """Minimise |res(p)|² by Levenberg–Marquardt with a central-difference Jacobian (a few parameters only)."""
    p = np.asarray(p0, float)
    r, lam = res(p), 1e-3
    for _ in range(iters):
        J = np.stack([(res(p + h) - res(p - h)) / 2e-6 for h in np.eye(len(p)) * 1e-6], 1)
        g, H = J.T @ r, J.T @ J
        while lam < 1e12:
            step = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), -g)
            r_new = res(p + step)
            if np.all(np.isfinite(r_new)) and r_new @ r_new < r @ r:
                break
            lam *= 4
        else:
            break  # no step lowers the cost: converged
        done = r @ r - r_new @ r_new < 1e-14 * (r @ r)
        p, r, lam = p + step, r_new, lam / 3
        if done:
            break
    return p, float(r @ r)


def fit_param(curves, x_min=0.05, window=1):
    """Fit Eq. 4's b = b0·τ^b1 and q = q0·TPP^q1 to complete runs' normalised curves (b1, q1 only when τ, TPP
    vary by more than 1%): least squares on log ℓ, each run weighted equally, from 9 starts. Returns a dict."""
    cols = []
    for c in curves:
        if c.x[-1] < COMPLETE:
            raise CollapseError(f"run {c.name!r} ends at x = {c.x[-1]:.3g}; fitting the shape needs complete runs")
        y, sel, eta = smooth(c.x, c.loss, window), c.x >= x_min, eta_of(c)
        n = int(sel.sum())
        cols.append(np.stack([c.x[sel], np.log(y[sel] / y[-1]), eta(c.x[sel]), np.full(n, eta(np.ones(1))[0]),
                              np.full(n, c.tau or 1.0), np.full(n, c.tpp or 1.0), np.full(n, 1.0 / n)]))
    x, logy, e, e1, ta, tp, w = np.concatenate(cols, 1)
    fit_b1, fit_q1 = ta.max() > 1.01 * ta.min(), tp.max() > 1.01 * tp.min()
    unpack = lambda p: (math.exp(p[0]), p[2] if fit_b1 else 0.0, p[1], p[-1] if fit_q1 else 0.0)
    def res(p):
        b0, b1, q0, q1 = unpack(p)
        b, q = b0 * ta ** b1, q0 * tp ** q1
        with np.errstate(all="ignore"):
            return np.sqrt(w / len(curves)) * (np.log(eq4(x, e, b, q) / eq4(1.0, e1, b, q)) - logy)
    extra = [0.0] * (int(fit_b1) + int(fit_q1))
    best = min((_levenberg_marquardt(res, [lb, q0] + extra) for lb in (math.log(0.1), 0.0, math.log(10.0))
                for q0 in (0.5, 1.0, 2.0)), key=lambda t: t[1] if math.isfinite(t[1]) else math.inf)
    if not math.isfinite(best[1]):
        raise CollapseError("the parametric shape (Eq. 4) could not be fitted to the reference runs")
    b0, b1, q0, q1 = unpack(best[0])
    return {"b0": b0, "b1": float(b1), "q0": float(q0), "q1": float(q1), "rmse_log": math.sqrt(best[1])}


def param_reference(fit, c):
    """The Eq. 4 shape ℓ̂(x) = eq4(x)/eq4(1) for run c under a fitted dict, as a function of x."""
    b = fit["b0"] * (c.tau or 1.0) ** fit["b1"]
    q = fit["q0"] * (c.tpp or 1.0) ** fit["q1"]
    eta = eta_of(c)
    return lambda x: eq4(np.asarray(x, float), eta(np.asarray(x, float)), b, q) / eq4(1.0, eta(np.ones(1))[0], b, q)

# -----------------------------------------------------------------------------
# live monitor

class CollapseMonitor:
    """Compares a live run with the normalised shape of healthy reference runs (Bergsma et al. 2025: their 1.8B run's
    numerics bug).
    L(1) of a live run is unknown, so each update fits it as `forecast` does, on the points seen so far with
    x_min ≤ x ≤ fit_until; after fit_until the implied L(1) stays frozen, so a pathology that starts later
    cannot be absorbed into the scale (one that starts earlier is partly absorbed: the price of not knowing L(1)).
    Alert when the trailing mean of the last `window` residuals L/L̂(1) − ℓ_ref(x) exceeds `margin` × the rms
    that the reference runs themselves show within ±0.1 in x, each replayed against a reference built without it.
    ℓ_ref is the reference runs' mean shape; given the monitored run's `size` N and references of ≥ 2 sizes, it is
    their shape regressed on log N at every x, ℓ_ref(x; N) = a(x) + b(x)·log N (ours: a family that still drifts a
    little with size, as small ones do, is then compared with its shape at this N, not with its mean), and each
    reference size is replayed against the regression on the other sizes — only sizes inside the others' range when
    N is inside the reference range (interpolations, like this run's own reference), else only the end sizes (all
    sizes where there are none of the kind). `self.about` says which reference is in use, in one line."""

    def __init__(self, reference, *, size=None, fit_until=0.3, x_min=0.05, window=3, margin=5.0, floor=1e-4):
        """reference: Curves, or what load_curves reads (run directories' validation loss, or CSV); one that cannot
        be read raises CollapseError."""
        refs = reference
        if not (reference and isinstance(reference[0], Curve)):
            try:
                refs = load_curves(reference, signal="val")
            except CollapseError as e:  # train.py --collapse_ref: say which input it was
                raise CollapseError(f"collapse monitor reference: {e}") from None
        if size is not None and not (math.isfinite(size) and size > 0):
            raise CollapseError(f"collapse monitor: the run's size must be a positive parameter count, got {size}")
        self.fit_until, self.x_min, self.window = fit_until, x_min, window
        self.grid = np.linspace(max(c.x[0] for c in refs), 1.0, 400)
        ells = np.stack([normalise([c], "none", max(1, len(c.x) // 50), self.grid)[2][0] for c in refs])
        sizes = np.array([c.size or 0.0 for c in refs], float)   # _checked: a size is None or positive
        ends = (sizes.min(), sizes.max())
        self.by_size = size is not None and ends[0] > 0 and ends[0] < ends[1]
        if self.by_size:
            self.ref = size_shape(ells, sizes, size)
            inner = lambda N: ends[0] < N < ends[1]
            replay = [j for j in range(len(refs)) if inner(sizes[j]) == inner(size)] or range(len(refs))
            pairs = [(j, size_shape(ells[sizes != sizes[j]], sizes[sizes != sizes[j]], sizes[j])) for j in replay]
            self.about = (f"the shape of {len(refs)} reference runs at N = {size:,.0f}, regressed on log N over sizes "
                          f"{ends[0]:,.0f}-{ends[1]:,.0f}" + ("" if inner(size) else " (an extrapolation)"))
        else:
            self.ref = ells.mean(0)
            pairs = [(j, np.delete(ells, j, 0).mean(0) if len(refs) > 1 else ells[j]) for j in range(len(refs))]
            self.about = f"the mean shape of {len(refs)} reference runs" + (
                " (not at this run's size: the references lack sizes or have one)" if size is not None else "")
        px = np.concatenate([refs[j].x[refs[j].x >= x_min] for j, _ in pairs])
        ps = np.concatenate([self._track(refs[j].x, refs[j].loss, o)[1][refs[j].x >= x_min] for j, o in pairs])
        near = np.abs(self.grid[:, None] - px[None, :]) <= 0.1
        rms = np.sqrt((near * ps ** 2).sum(1) / np.maximum(near.sum(1), 1))
        rms[near.sum(1) == 0] = np.sqrt(np.mean(ps ** 2))
        self.band = np.maximum(margin * rms, floor)
        self.xs, self.losses = [], []

    def _track(self, x, loss, ref):
        """Residuals and their trailing mean at every point of a history, as the live update would see them."""
        x, loss = np.asarray(x, float), np.asarray(loss, float)
        ref_x = np.interp(x, self.grid, ref)
        d = np.log(loss) - np.log(ref_x)
        m = ((x >= self.x_min) & (x <= self.fit_until)).astype(float)
        cn, cs = np.cumsum(m), np.cumsum(d * m)
        log_L1 = np.where(cn > 0, cs / np.maximum(cn, 1), np.cumsum(d) / np.arange(1, len(d) + 1))
        r = loss / np.exp(log_L1) - ref_x
        c = np.concatenate([[0.0], np.cumsum(r)])
        k = np.minimum(np.arange(1, len(r) + 1), self.window)
        return r, (c[1:] - c[np.arange(1, len(r) + 1) - k]) / k, np.exp(log_L1)

    def update(self, x, loss):
        """Record (x = tokens/D, loss) and return residual, smoothed residual, band, implied L(1) and alert."""
        if not (math.isfinite(x) and math.isfinite(loss) and loss > 0):
            return {"x": x, "residual": float("nan"), "smoothed": float("nan"), "band": float("nan"),
                    "L1_hat": float("nan"), "alert": True, "warning": f"collapse monitor: loss {loss} at x = {x:.3f}"}
        self.xs.append(float(x))
        self.losses.append(float(loss))
        r, s, L1 = self._track(self.xs, self.losses, self.ref)
        band = float(np.interp(x, self.grid, self.band))
        alert = bool(x >= self.x_min and abs(s[-1]) > band)
        msg = (f"collapse monitor: smoothed residual {s[-1]:+.4f} at x = {x:.3f} is outside the healthy band "
               f"±{band:.4f}") if alert else None
        return {"x": float(x), "residual": float(r[-1]), "smoothed": float(s[-1]), "band": band,
                "L1_hat": float(L1[-1]), "alert": alert, "warning": msg}

# -----------------------------------------------------------------------------
# command line

def analyze(curves, offset="none", window=1, ref=None, force=False):
    """Normalise, then Δ, σ and per-run residual MAE against a reference (a run's name, or the mean curve)."""
    if len(curves) < 2:
        raise CollapseError(f"analyze needs at least 2 runs, got {len(curves)}")
    check_mixing(curves, force)
    grid, L, ell, L0 = normalise(curves, offset, window)
    delta, sigma = collapse_stats(curves, L, ell, L0)
    names = [c.name for c in curves]
    if ref is not None and ref not in names:
        raise CollapseError(f"--ref={ref} is not one of the runs ({', '.join(names)})")
    ell_ref = ell[names.index(ref)] if ref else ell.mean(0)
    late = grid >= 0.2  # Bergsma's residual r(x) = ℓ_run(x) − ℓ_ref(x), summarised as mean |r| over x ∈ [0.2, 1]
    mae = np.abs(ell[:, late] - ell_ref[late]).mean(1)
    at = lambda v: [float(a) if math.isfinite(a) else None  # null where σ is undefined (no seeds)
                    for a in (np.interp(X_REPORT, grid, v) if v is not None else [math.nan] * len(X_REPORT))]
    return {"x": X_REPORT, "delta": at(delta), "sigma": at(sigma), "L0": L0,
            "normalisation": "L/L(1)" if offset in ("none", None) else "(L-L0)/(L(1)-L0)", "reference": ref or "mean",
            "runs": [{"run": c.name, "size": c.size, "seed": c.seed, "L1": float(L[i, -1]), "mae": float(mae[i])}
                     for i, c in enumerate(curves)],
            "arrays": (grid, L, ell, delta, sigma)}


def forecast_runs(runs, refs, at=0.3, shape="curve", window=1, force=False):
    """Forecast every run's final loss from its prefix x ≤ at, against the mean normalised curve of the reference
    runs (shape "curve"), their curves regressed on log N at the run's size ("size", `size_shape`) or Eq. 4 fitted
    on them ("param"); errors where the truth is known; rank by forecast."""
    if not 0 < at <= 1:
        raise CollapseError(f"--at={at} must be in (0, 1]")
    check_mixing(runs + refs, force)
    if shape not in ("curve", "size", "param"):
        raise CollapseError(f"--shape={shape} must be 'curve', 'size' or 'param'")
    if shape == "size" and any(not c.size for c in runs + refs):
        raise CollapseError("--shape=size needs a size for every run (config 'N' or the CSV's size column)")
    fit = fit_param(refs, window=window) if shape == "param" else None
    if shape != "param":
        grid, _, ell, _ = normalise(refs, "none", window)
        ref_sizes = [r.size for r in refs]
    out = []
    for c in runs:
        pre = c.x <= at + 1e-12
        if pre.sum() < 3:
            raise CollapseError(f"run {c.name!r} has {int(pre.sum())} points with x ≤ {at}; a forecast needs 3")
        if shape == "param":
            ref_fn = param_reference(fit, c)
        else:
            s = size_shape(ell, ref_sizes, c.size) if shape == "size" else ell.mean(0)
            ref_fn = lambda x, s=s: np.interp(x, grid, s)
        L1 = forecast(c.x[pre], c.loss[pre], ref_fn, window=window)
        row = {"run": c.name, "L1_hat": L1, "L1": None, "err": None, "curve_mae": None}
        if c.x[-1] >= COMPLETE:
            y = smooth(c.x, c.loss, window)
            late = c.x >= 0.2
            row.update(L1=float(y[-1]), err=L1 / float(y[-1]) - 1,
                       curve_mae=float(np.mean(np.abs(L1 * ref_fn(c.x[late]) / y[late] - 1))))
        out.append(row)
    out.sort(key=lambda r: r["L1_hat"])
    res = {"at": at, "shape": shape, "fit": fit, "ranking": out, "picked": out[0]["run"]}
    if all(r["L1"] is not None for r in out):
        res["true_best"] = min(out, key=lambda r: r["L1"])["run"]
        res["mean_abs_err"] = float(np.mean([abs(r["err"]) for r in out]))
    return res


def plot_collapse(curves, res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid, L, ell, delta, sigma = res["arrays"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, c in enumerate(curves):
        ax[0].plot(c.x, c.loss, lw=0.8, label=c.name)
        ax[1].plot(grid, ell[i], lw=0.8)
    ax[2].semilogy(grid[:-1], delta[:-1], label="Δ(x) across runs")  # Δ(1) = 0 by construction
    if sigma is not None:
        ax[2].semilogy(grid[:-1], sigma[:-1], label="σ(x) seed noise floor")
    for a, t in zip(ax, ("raw loss", f"normalised {res['normalisation']}", "collapse deviation")):
        a.set_xlabel("x = fraction of run")
        a.set_title(t)
    ax[0].legend(fontsize=6)
    ax[2].legend()
    try:
        save_figure(fig, path, format=os.path.splitext(path)[1][1:] or "png")
    except ValueError:
        raise CollapseError(f"--plot={path}: unknown image format (use .png, .pdf or .svg)")


def write_csv(curves, path):
    """Long CSV (run, step, loss, size, seed, schedule, tpp, tau, lr), written atomically."""
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "loss", "size", "seed", "schedule", "tpp", "tau", "lr"])
        for c in curves:
            for i, (x, l) in enumerate(zip(c.x, c.loss)):
                w.writerow([c.name, i + 1, repr(float(l)), c.size, c.seed, c.schedule, c.tpp, c.tau,
                            "" if c.eta is None else repr(float(c.eta[i]))])


def floats(text):
    return [float(v) for v in text.split(",")]


def main(argv):
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("recipe", help="a compute-efficient run: tokens, batch, steps and the λ that hits τ_opt")
    c.add_argument("--params", type=float, required=True, help="model parameters N")
    c.add_argument("--tpp", type=float, default=20.0, help="training tokens per parameter")
    c.add_argument("--lr", type=float, default=1.2e-2, help="peak learning rate η")
    c.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    c.add_bool("--json", help="print the result as JSON")
    for name, what in (("analyze", "collapse deviation Δ, seed noise floor σ and per-run residuals of a family"),
                       ("forecast", "final losses of (partial) runs from a prefix, against reference runs")):
        c = sub.add_parser(name, help=what)
        c.add_argument("--runs", required=True, help="run directories, CSVs or globs, comma-separated")
        c.add_argument("--x", help="the CSV column of progress (default: tokens, compute or step)")
        c.add_argument("--size_col", help="the CSV column of model size")
        c.add_argument("--seed_col", help="the CSV column of seed")
        c.add_argument("--smooth", type=int, default=1, help="moving-average window, in points")
        c.add_argument("--signal", default="train", help="a run directory's training loss (train) or its first "
                       "domain's validation loss (val)")
        c.add_bool("--force", help="accept runs that mix LR schedules or tokens per parameter")
        c.add_bool("--json", help="print the result as JSON")
    c = sub.choices["analyze"]
    c.add_argument("--offset", default="none", help="none (L/L(1)), fit or a number L0 ((L-L0)/(L(1)-L0))")
    c.add_argument("--ref", help="the run the residuals are taken against (default: the mean curve)")
    c.add_argument("--plot", help="write the curves to this .png, .pdf or .svg")
    c = sub.choices["forecast"]
    c.add_argument("--ref", required=True, help="the reference runs, as --runs")
    c.add_argument("--at", type=float, default=0.3, help="forecast from the prefix x <= at")
    c.add_argument("--shape", default="curve", help="curve (mean reference curve), size (reference curves regressed "
                   "on log N, at each run's size) or param (Eq. 4 fitted on them)")
    c = sub.add_parser("synth", help="write a synthetic family of runs to a CSV, to try the tools on")
    c.add_argument("--out", required=True, help="the CSV to write")
    c.add_argument("--tau", type=floats, default=[0.2], help="AdamW timescales, comma-separated")
    c.add_argument("--seeds", type=int, default=2, help="seeds per size and τ")
    c.add_argument("--L0", type=float, default=0.0, help="irreducible loss")
    o = p.parse_args(argv)
    cmd = o.command
    if cmd == "synth":
        curves = [c for i, t in enumerate(o.tau) for c in synthetic([1e6, 4e6, 16e6, 64e6], t, o.seeds, L0=o.L0,
                                                                   noise=0.002, seed_sd=0.003, rng=i)]
        write_csv(curves, o.out)
        print(f"wrote {len(curves)} runs to {o.out}")
        return
    load = lambda spec: load_curves(spec, o.x, o.size_col, o.seed_col, o.signal)
    if cmd == "recipe":
        res = recipe(o.params, o.tpp, o.lr, o.seq_len)
    elif cmd == "analyze":
        curves = load(o.runs)
        res = analyze(curves, o.offset, o.smooth, o.ref, o.force)
        if o.plot:
            plot_collapse(curves, res, o.plot)
        res.pop("arrays")
    else:
        res = forecast_runs(load(o.runs), load(o.ref), o.at, o.shape, o.smooth, o.force)
    if o.json:
        print(json.dumps(res))
    elif cmd == "recipe":
        print("\n".join(f"{k:>13} {v:.6g}" if isinstance(v, float) else f"{k:>13} {v}" for k, v in res.items()))
    elif cmd == "analyze":
        print(f"normalisation {res['normalisation']}, L0 = {res['L0']:.4g}, reference {res['reference']}")
        fmt = lambda v: "    -   " if v is None else f"{v:8.2e}"
        for p, d, s in zip(res["x"], res["delta"], res["sigma"]):
            print(f"x = {p:4.2f}   Δ = {fmt(d)}   σ = {fmt(s)}")
        for r in res["runs"]:
            print(f"{r['run']:>24}  L(1) = {r['L1']:.4f}  residual MAE[0.2,1] = {100 * r['mae']:.3f}%")
    else:
        for i, r in enumerate(res["ranking"], 1):
            truth = "" if r["L1"] is None else f"  true {r['L1']:.4f}  err {100 * r['err']:+.2f}%"
            print(f"{i:3d} {r['run']:>24}  forecast L(1) = {r['L1_hat']:.4f}{truth}")
        if "true_best" in res:
            print(f"picked {res['picked']}, true best {res['true_best']}, mean |err| {100 * res['mean_abs_err']:.2f}%")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CollapseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
