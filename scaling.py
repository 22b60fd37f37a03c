"""
Scaling laws: fit them, score their forecasts, and plan with them. Stands alone (numpy + torch).

    python scaling.py fit --law=chinchilla --data=points.csv [--bootstrap=200] [--json] [--plot=fit.png]
    python scaling.py optimal --fit=fit.json --compute=1e21      (fit.json: the output of `fit --json`)
    python scaling.py cpt --data=runs.csv|<run dirs> --train_ptpp=15,31 --test_ptpp=279 [--save=fits.json]
    python scaling.py plan --fit=fits.json|target.json,base.json [--law=ptpp_transfer] --N=1e6 --ptpp=279 \
        --target_loss=2.1 --max_forgetting=0.05 [--max_compute=1e15] [--base_loss_before=2.9]

`fit` reads a CSV with the law's inputs and `loss` (chinchilla: N, D; powerlaw: x; dcpt: N, D, r; ptpp_*:
N, D, r, ptpp). `cpt` reads run directories (read_runs) or CSVs with one row per run: N (base model params),
ptpp (base pre-training tokens / N), D (CPT tokens), replay (share of CPT tokens from the base domain),
target_loss, base_loss (after CPT), optionally target_loss_before, base_loss_before (for MAE_rel).
"""
import contextlib
import csv
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from configurator import ArgumentParser, atomic, save_figure

DELTA = 1e-3  # Huber delta on log residuals (Hoffmann et al. 2022; Besiroglu et al. 2024)


class ScalingError(Exception):
    """A problem with the user's input, reported as one sentence."""


# -----------------------------------------------------------------------------
# laws: log L_hat = fn(x, p); x: inputs (P,), p: parameters (S, 1); result (S, P)

def _lse(*terms):
    """log(sum(exp(terms))) directly, 2.5x faster than chained logaddexp: terms near log L are far from overflow."""
    return torch.log(sum(map(torch.exp, terms[1:]), torch.exp(terms[0])))

def _log(v):
    return torch.log(v.clamp_min(1e-30))  # mixture shares may be 0: r^eta -> 0, log stays finite

def chinchilla(x, p):
    """L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Approach 3)."""
    return _lse(p["log_E"], p["log_A"] - p["alpha"] * torch.log(x["N"]), p["log_B"] - p["beta"] * torch.log(x["D"]))

def powerlaw(x, p):
    """L(x) = L0 + a * x^(-b): one-variable law, e.g. final loss against compute (Qiu et al. 2025)."""
    return _lse(p["log_L0"], p["log_a"] - p["b"] * torch.log(x["x"]))

def dcpt(x, p):
    """D-CPT law (Que et al. 2024): L(N, D, r) = E + A/N^alpha + B r^eta / D^beta + C/(r + eps)^gamma.
    r is the mixture share OF THE DOMAIN BEING MODELLED: 1 - replay for the target-domain loss, replay for
    the base-domain loss (Que et al. 2024, arXiv 2406.01375); eps > 0 is fitted.
    No PTPP input: the PTPP-agnostic baseline."""
    return _lse(p["log_E"], p["log_A"] - p["alpha"] * torch.log(x["N"]),
                p["log_B"] + p["eta"] * _log(x["r"]) - p["beta"] * torch.log(x["D"]),
                p["log_C"] - p["gamma"] * torch.log(x["r"] + torch.exp(p["log_eps"])))

def ptpp_power(x, p):
    """OUR PTPP-aware form (a): L = E + A/N^alpha + P^nu (B r^eta / D^beta + C / (r + eps)^gamma), P = PTPP.
    Fitted at one pre-training budget, D-CPT's B and C absorb how far above its floor E + A/N^alpha the base model
    sits on this domain; that excess scales as P^nu (nu < 0 for a seen domain: longer pre-training starts nearer the
    floor), one exponent pinned by two training PTPPs. Separate exponents let a term small at those PTPPs run off:
    held-out MAPE reached 60% (target, the experiments' PTPP 60 runs) and 1,000% (base, synthetic); tied: 0.8%, 7%."""
    lP = torch.log(x["ptpp"])
    return dcpt(x, dict(p, log_B=p["log_B"] + p["nu"] * lP, log_C=p["log_C"] + p["nu"] * lP))

def ptpp_transfer(x, p):
    """OUR PTPP-aware form (b): L = E + A/N^alpha + B / D_eff^beta + F ((1 - r) D / (P N))^phi, a Chinchilla data
    term at D_eff = r D + k (P N)^kappa in-domain tokens: the P N pre-training tokens add the "effective data
    transferred" of Hernandez et al. 2021 (D_T = k D_F^alpha N^beta, without the N factor; k ~ kappa ~ 1 for the base
    domain, k << 1 for a new one). Forgetting is a power of the other domain's tokens per pre-training token: a model
    that has seen more moves less per new token. At D = 0 this is the pre-CPT loss; at k = kappa = 1,
    Chinchilla's L(N, P N). Nine parameters, each with its own role, pinned by two PTPPs and a few sizes."""
    lN, lP, r = torch.log(x["N"]), torch.log(x["ptpp"]), x["r"]
    log_Deff = _lse(_log(r) + torch.log(x["D"]), p["log_k"] + p["kappa"] * (lP + lN))
    foreign = _log(1 - r) + torch.log(x["D"]) - lP - lN
    return _lse(p["log_E"], p["log_A"] - p["alpha"] * lN, p["log_B"] - p["beta"] * log_Deff,
                p["log_F"] + p["phi"] * foreign)

@dataclass
class Law:
    fn: object
    inputs: tuple
    grid: dict  # parameter -> initial values; starts are the Cartesian product

_CPT_GRID = dict(log_E=[-1.0, 0.0, 1.0], log_A=[0.0, 5.0, 10.0], alpha=[0.3, 1.0], log_B=[0.0, 5.0, 10.0],
                 beta=[0.3, 1.0])
LAWS = {
    # Hoffmann et al. 2022's Approach 3 grid: alpha, beta in {0, .5, .., 2}, e in {-1, -.5, .., 1},
    # a, b in {0, 5, .., 25}: 4,500 starts
    "chinchilla": Law(chinchilla, ("N", "D"), dict(log_E=np.arange(-1, 1.01, 0.5), log_A=np.arange(0, 26, 5.0),
                      log_B=np.arange(0, 26, 5.0), alpha=np.arange(0, 2.01, 0.5), beta=np.arange(0, 2.01, 0.5))),
    "powerlaw": Law(powerlaw, ("x",), dict(log_L0=[-1.0, 0.0, 1.0], log_a=np.arange(0, 26, 5.0),
                                           b=[0.1, 0.3, 0.6, 1.0])),
    "dcpt": Law(dcpt, ("N", "D", "r"), dict(_CPT_GRID, eta=[0.0, 1.0], log_C=[-3.0, 0.0], gamma=[0.5, 1.5],
                                             log_eps=[-3.0, 0.0])),
    "ptpp_power": Law(ptpp_power, ("N", "D", "r", "ptpp"), dict(_CPT_GRID, eta=[0.0, 1.0], nu=[0.0],
                      log_C=[-3.0, 0.0], gamma=[0.5, 1.5], log_eps=[-3.0, 0.0])),
    "ptpp_transfer": Law(ptpp_transfer, ("N", "D", "r", "ptpp"), dict(_CPT_GRID, log_k=[-5.0, 0.0],
                         kappa=[0.5, 1.0], log_F=[-5.0, -1.0], phi=[0.5, 1.0])),
}
CPT_LAWS = ("dcpt", "ptpp_power", "ptpp_transfer")  # ptpp_*: our design (the paper's equations are not public)

def _law(name):
    if name not in LAWS:
        raise ScalingError(f"unknown law {name!r}; known laws: {', '.join(LAWS)}")
    return LAWS[name]

def _public(raw):
    """log_X -> X = exp(log_X), which keeps coefficients positive; other parameters are reported as they are."""
    return {k.removeprefix("log_"): math.exp(v) if k.startswith("log_") else v for k, v in raw.items()}

def _raw(law, public):
    out = {}
    for k in law.grid:
        name, is_log = k.removeprefix("log_"), k.startswith("log_")
        v = public.get(name)
        if not isinstance(v, (int, float)) or (is_log and not v >= 0):
            raise ScalingError(f"the fit's parameter {name!r} is {v!r}, not a{' non-negative' * is_log} number")
        out[k] = (math.log(v) if v > 0 else -math.inf) if is_log else float(v)  # exp(log_X) may underflow to 0
    return out


# -----------------------------------------------------------------------------
# the batched fitter

def _lbfgs(f, x, max_iter=200, m=15, ftol=1e-6, gtol=1e-12):
    """Minimise S independent problems at once: f(z, rows) -> losses, row i of z (S, K) affecting loss i only.
    Each start has its own memory (m = 15; m = 10 doubled the iterations on the CPT laws) and line search,
    so one that diverges never steers the others; finished starts leave the batch. Stop when an iteration
    gains < ftol |f| (SciPy's rule made relative; 1e-6 is about SciPy's default on the benchmark), max |grad|
    <= gtol, or after max_iter. Bookkeeping in numpy, cheaper than torch for small ops (halved small fits)."""
    def fg(z, rows):
        zt = torch.from_numpy(z).requires_grad_(True)
        v = f(zt, torch.from_numpy(rows))
        g, = torch.autograd.grad(v.sum(), zt)
        v, g = v.detach().numpy(), g.numpy()
        bad = ~np.isfinite(v) | ~np.isfinite(g).all(1)  # the line search sees "no decrease"
        return np.where(bad, np.inf, v), np.where(bad[:, None], 0.0, g)
    S, K = x.shape
    rows = np.arange(S)
    fx, g = fg(x, rows)
    X, FX = x.copy(), fx.copy()  # results; a start whose initial loss is not finite never moves
    live = np.isfinite(fx)
    x, fx, g, rows = x[live], fx[live], g[live], rows[live]
    s_mem, y_mem, rho = np.zeros((len(x), m, K)), np.zeros((len(x), m, K)), np.zeros((len(x), m))
    gamma = 1.0 / np.maximum(np.abs(g).sum(1), 1.0)  # first step: at most unit length, as torch's LBFGS
    for it in range(max_iter):
        if len(rows) == 0:
            break
        # two-loop recursion (Nocedal & Wright 2006, Alg. 7.4), batched; a rejected curvature pair (rho = 0) is identity
        q, alphas = g.copy(), {}
        slots = [(it - 1 - j) % m for j in range(min(it, m))]  # newest first
        for k in slots:
            alphas[k] = rho[:, k] * np.einsum("ij,ij->i", s_mem[:, k], q)
            q -= alphas[k][:, None] * y_mem[:, k]
        d = gamma[:, None] * q
        for k in reversed(slots):
            d += s_mem[:, k] * (alphas[k] - rho[:, k] * np.einsum("ij,ij->i", y_mem[:, k], d))[:, None]
        gd = -np.einsum("ij,ij->i", g, d)
        uphill = gd >= 0  # lost curvature: fall back to steepest descent
        d = -np.where(uphill[:, None], g, d)
        gd = np.where(uphill, -(g * g).sum(1), gd)
        t, xn = np.ones_like(gd), x + d  # backtracking line search, each start with its own step t
        fn, gn = fg(xn, rows)
        ok = fn <= fx + 1e-4 * gd
        for _ in range(40):
            todo = np.flatnonzero(~ok)
            if len(todo) == 0:
                break
            tt = t[todo]  # minimiser of the quadratic through f(0), f'(0), f(t), in [0.1 t, 0.5 t] (inf loss: 0.1 t)
            with np.errstate(divide="ignore", invalid="ignore"):
                t[todo] = np.clip(-gd[todo] * tt * tt / (2 * (fn[todo] - fx[todo] - gd[todo] * tt)), 0.1 * tt, 0.5 * tt)
            xn[todo] = x[todo] + t[todo, None] * d[todo]
            fn[todo], gn[todo] = fg(xn[todo], rows[todo])
            ok[todo] = fn[todo] <= fx[todo] + 1e-4 * t[todo] * gd[todo]
        s, y = xn - x, gn - g
        sy, yy = np.einsum("ij,ij->i", s, y), np.einsum("ij,ij->i", y, y)
        good = ok & (sy > 1e-12 * np.sqrt(yy * np.einsum("ij,ij->i", s, s)))
        s_mem[:, it % m], y_mem[:, it % m] = s * good[:, None], y * good[:, None]
        rho[:, it % m] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        gamma = np.where(good, sy / np.where(good, yy, 1.0), gamma)
        small = (fx - fn <= ftol * np.maximum(np.abs(fx), np.abs(fn))) | (np.abs(gn).max(1) <= gtol)
        x, fx, g = np.where(ok[:, None], xn, x), np.where(ok, fn, fx), np.where(ok[:, None], gn, g)
        done = ~ok | small  # no decrease found, or converged
        if done.any():
            X[rows[done]], FX[rows[done]] = x[done], fx[done]
            x, fx, g, rows, s_mem, y_mem, rho, gamma = (v[~done] for v in (x, fx, g, rows, s_mem, y_mem, rho, gamma))
    X[rows], FX[rows] = x, fx
    return X, FX

def huber_on_log(pred, actual, delta=DELTA):
    """Our metric: mean over points of Huber_delta(log L_hat - log L)."""
    r = torch.as_tensor(np.log(pred) - np.log(actual), dtype=torch.float64)
    return float(F.huber_loss(r, torch.zeros_like(r), delta=delta, reduction="mean"))

def _check(name, v, n):
    """Values must be finite, and positive, or in [0, 1] for mixture shares."""
    v = np.atleast_1d(np.asarray(v, dtype=np.float64))
    if len(v) != n:
        raise ScalingError(f"column {name!r} has {len(v)} values but the loss has {n}")
    share = name in ("r", "replay")
    bad = np.flatnonzero(~np.isfinite(v) | (((v < 0) | (v > 1)) if share else (v <= 0)))
    if len(bad):
        need = "in [0, 1]" if share else "positive"
        raise ScalingError(f"column {name!r} must be finite and {need}, but row {bad[0] + 1} is {v[bad[0]]}")
    return v

@dataclass
class Fit:
    law: str
    params: dict  # reported names: E, A, alpha, ...
    loss: float  # summed Huber on log residuals at the optimum
    n: int  # number of points fitted
    ci: dict = None  # parameter -> [2.5%, 97.5%] bootstrap percentiles

    def predict(self, **inputs):
        law = _law(self.law)
        if not set(law.inputs) <= inputs.keys():
            raise ScalingError(f"law {self.law} needs inputs {', '.join(law.inputs)}")
        x = {k: torch.as_tensor(np.asarray(inputs[k], dtype=np.float64)).reshape(-1) for k in law.inputs}
        p = {k: torch.tensor([[v]], dtype=torch.float64) for k, v in _raw(law, self.params).items()}
        return torch.exp(law.fn(x, p))[0].numpy()

    def to_json(self):
        return dict(law=self.law, params=self.params, ci=self.ci, loss=self.loss, n=self.n)

    @classmethod
    def from_json(cls, d):
        if not isinstance(d, dict) or "law" not in d or "params" not in d:
            raise ScalingError("a fit must be a JSON object with 'law' and 'params'")
        _raw(_law(d["law"]), d["params"])
        return cls(d["law"], d["params"], d.get("loss", math.nan), d.get("n", 0), d.get("ci"))

def fit_law(law_name, columns, loss, bootstrap=0, grid=None, seed=0):
    """From each start of the grid (law.grid, or grid), minimise the SUM over points of Huber_delta(log L_hat - log L)
    (Besiroglu et al. 2024); bootstrap > 0 adds 95% percentile CIs."""
    law, n = _law(law_name), len(np.atleast_1d(loss))
    for k in law.inputs:
        if k not in columns:
            raise ScalingError(f"missing column {k!r}; this law needs {', '.join(law.inputs)}")
    x = {k: torch.tensor(_check(k, columns[k], n)) for k in law.inputs}
    logy = torch.log(torch.tensor(_check("loss", loss, n)))
    names = list(law.grid)
    if n < len(names):
        raise ScalingError(f"law {law_name} has {len(names)} parameters but only {n} points were given")

    def objective(z, rows, weights=None):  # weights: (S, P) point counts, for the bootstrap
        h = F.huber_loss(law.fn(x, {k: z[:, i:i + 1] for i, k in enumerate(names)}), logy.expand(len(z), -1),
                         delta=DELTA, reduction="none")
        return (h if weights is None else h * weights[rows]).sum(1)

    starts = np.array(list(itertools.product(*((grid or law.grid)[k] for k in names))), dtype=np.float64)
    threads = torch.get_num_threads()
    # one thread: on the shared 2-core dev machine two threads made the 4,500-start fit 6x slower
    # (60 s vs 9 s), as the many small late batches pay thread synchronisation on every op
    torch.set_num_threads(1)
    try:
        theta, val = _lbfgs(objective, starts)
        if not np.isfinite(val).any():
            raise ScalingError(f"law {law_name} could not be fitted: every start gave a non-finite loss")
        # polish the 10 best to a relative gain of 1e-12 (few starts, so cheap): the 200-iteration cap
        # and, along flat valleys such as dcpt's (C, gamma, eps), ftol = 1e-6 halt early (eps 10% off)
        polish = dict(max_iter=3000, ftol=1e-12, gtol=0.0)
        theta, val = _lbfgs(objective, theta[np.argsort(val)[:10]], **polish)
        theta, val = theta[np.argmin(val)], np.min(val)
        ci = None
        if bootstrap > 0:
            # resampled points = draw-count weights; all replicates start at the full-data optimum, in one batch
            w = torch.tensor(np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=bootstrap),
                             dtype=torch.float64)
            th, v = _lbfgs(lambda z, rows: objective(z, rows, w), np.tile(theta, (bootstrap, 1)), **polish)
            reps = [_public(dict(zip(names, r))) for r in th[np.isfinite(v)].tolist()]
            ci = {k: [float(np.percentile([r[k] for r in reps], q)) for q in (2.5, 97.5)] for k in reps[0]}
    finally:
        torch.set_num_threads(threads)
    return Fit(law_name, _public(dict(zip(names, theta.tolist()))), float(val), n, ci)

def metrics(pred, actual, before=None):
    """CPT forecast metrics (our definitions, docs/science.md §5): Huber-on-log (mean);
    MAE_rel = mean|L_hat - L| / mean|L - L_before| (None without before); calibration slope: least squares of L on
    L_hat (ideal 1); RMSE; MAPE = 100 mean|L_hat - L| / L."""
    p, a = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    err, dp, da = p - a, p - p.mean(), a - a.mean()
    gain = None if before is None else np.mean(np.abs(a - np.asarray(before, np.float64)))
    return dict(huber_on_log=huber_on_log(p, a),
                mae_rel=None if not gain else float(np.mean(np.abs(err)) / gain),
                calibration_slope=float((dp * da).sum() / (dp * dp).sum()) if (dp * dp).sum() > 0 else None,
                rmse=float(np.sqrt(np.mean(err ** 2))), mape=float(100 * np.mean(np.abs(err) / a)))


# -----------------------------------------------------------------------------
# input files

CPT_COLUMNS = ("N", "ptpp", "D", "replay", "target_loss", "base_loss")
CPT_BEFORE = ("target_loss_before", "base_loss_before")

def read_csv(path, required, optional=()):
    """The named numeric columns of a CSV file, checked value by value."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows, header = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingError(f"cannot read {path}: {e}")
    missing = [c for c in required if c not in header]
    if missing or not rows:
        raise ScalingError(f"{path} has no column {missing[0]!r} (it has: {', '.join(header) or 'nothing'})"
                           if missing else f"{path} has no data rows")
    out = {}
    try:
        for c in list(required) + [c for c in optional if c in header]:
            for i, row in enumerate(rows):
                try:
                    row[c] = float(row[c])
                except (TypeError, ValueError):
                    raise ScalingError(f"column {c!r} row {i + 1} is {row[c]!r}, not a number")
            out[c] = _check(c, [row[c] for row in rows], len(rows))
    except ScalingError as e:
        raise ScalingError(f"{path}: {e}")
    return out

def _read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise ScalingError(f"cannot read {path}: {e}")

def read_runs(path):
    """CPT runs from one run directory or a folder of them (train.py's run directories): config.json's "cpt" block gives
    N, PTPP, replay and the domain names; log.jsonl's eval at step 0 the "before" losses, its last the "after"."""
    is_run = lambda d: os.path.exists(os.path.join(d, "config.json"))
    dirs = [path] if is_run(path) else [d for d in sorted(os.path.join(path, n) for n in os.listdir(path)) if is_run(d)]
    rows = []
    for d in dirs:
        cfg = _read_json(os.path.join(d, "config.json"))
        cpt = cfg.get("cpt") if isinstance(cfg, dict) else None
        if not cpt:
            if d == path:
                raise ScalingError(f"{d} is not a CPT run (its config.json has no 'cpt' block)")
            continue  # pre-training runs in a folder of runs are not CPT data
        try:
            with open(os.path.join(d, "log.jsonl")) as fh:
                evals = [e for e in map(json.loads, filter(str.strip, fh)) if "val" in e]
            after, before = [e for e in evals if e["step"] > 0], [e for e in evals if e["step"] == 0]
            if not after:
                raise ScalingError(f"{d}/log.jsonl has no eval after step 0, so the run has no final losses")
            row = dict(N=cpt["base_N"], ptpp=cpt["base_ptpp"], D=cfg["D"], replay=cpt["replay"])
            for key, dom in (("target_loss", cpt["target_domain"]), ("base_loss", cpt["base_domain"])):
                row[key] = after[-1]["val"][dom]
                if before:
                    row[key + "_before"] = before[0]["val"][dom]
        except (OSError, ValueError) as e:
            raise ScalingError(f"cannot read {d}/log.jsonl: {e}")
        except KeyError as e:
            raise ScalingError(f"{d}: config.json or log.jsonl lacks {e.args[0]!r}")
        rows.append(row)
    if not rows:
        raise ScalingError(f"{path} holds no CPT run directories")
    return {k: _check(k, [r[k] for r in rows], len(rows)) for k in CPT_COLUMNS + CPT_BEFORE
            if all(k in r for r in rows)}

def load_cpt(spec):
    """CPT runs from a comma-separated list of CSV files and run directories, as one table."""
    parts = []
    for path in spec.split(","):
        if not (os.path.isdir(path) or os.path.isfile(path)):
            raise ScalingError(f"{path} is neither a CSV file nor a directory")
        parts.append(read_runs(path) if os.path.isdir(path) else read_csv(path, CPT_COLUMNS, CPT_BEFORE))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}


# -----------------------------------------------------------------------------
# the CPT planner

def plan_grid(N, max_compute=None, n_r=1000, per_decade=200):
    """The planner's grid: replay r in [0, 1) in steps of 1/n_r; CPT tokens D log-spaced, per_decade a decade (1.16%
    apart at 200), from D = max_compute / (6 N), or 10^4 N, down 7 decades, or to 10^-3 N if that is further."""
    if max_compute is not None and not max_compute > 0:
        raise ScalingError(f"the compute cap must be positive, not {max_compute:g}")
    D_hi = max_compute / (6 * N) if max_compute is not None else 1e4 * N
    n = max(7.0, math.log10(D_hi / (1e-3 * N)))
    return np.arange(n_r) / n_r, D_hi * np.logspace(-n, 0, round(n * per_decade) + 1)

def plan(target, base, N, ptpp=None, target_loss=None, max_forgetting=math.inf, max_compute=None,
         base_loss_before=None, n_r=1000, per_decade=200):
    """Choose the replay ratio r and CPT tokens D: with target_loss, the least compute C = 6 N D that reaches it,
    else the least target loss; always forgetting <= max_forgetting and C <= max_compute. target, base: Fits of the
    target- and base-domain loss (modelled share 1 - r and r), of any shape: under D-CPT (Que et al. 2024, arXiv
    2406.01375) forgetting's B r^eta / D^beta FALLS with D at r > 0, so the least D reaching the target may forget
    too much where a larger D does not. Candidates per r: every D of plan_grid, and each point where a constraint
    flips between neighbouring D, bisected to float precision: never worse than the grid's best cell, exact at a
    boundary, an interior minimum of the target loss to the grid's spacing. Returns the best point and the
    frontier: each r's best D (NaN where no candidate meets every constraint)."""
    r, Dg = plan_grid(N, max_compute, n_r, per_decade)  # the grid stops at max_compute: no candidate exceeds it
    if base_loss_before is None:  # the base law's own pre-CPT loss, if it has one (D -> 0)
        base_loss_before = float(base.predict(N=N, D=0.0, r=0.0, ptpp=ptpp)[0])
        if not math.isfinite(base_loss_before):
            raise ScalingError(f"law {base.law} has no finite loss before CPT (D = 0); give --base_loss_before")
    limits = (math.inf if target_loss is None else target_loss, max_forgetting)
    laws = lambda i, D: (target.predict(N=N, D=D, r=1 - r[i], ptpp=ptpp),  # rows of r, D -> target loss, forgetting
                         base.predict(N=N, D=D, r=r[i], ptpp=ptpp) - base_loss_before)
    i, D = np.repeat(np.arange(n_r), len(Dg)), np.tile(Dg, n_r)
    T, fg = laws(i, D)
    for c, v in enumerate((T, fg)):  # where constraint c flips between D_j and D_j+1, bisect to its boundary
        P = (v <= limits[c]).reshape(n_r, -1)  # NaN meets no limit
        ci, cj = np.nonzero(P[:, :-1] != P[:, 1:])
        good, bad = np.where(P[ci, cj], Dg[cj], Dg[cj + 1]), np.where(P[ci, cj], Dg[cj + 1], Dg[cj])
        for _ in range(40):
            mid = np.sqrt(good * bad)
            ok = laws(ci, mid)[c] <= limits[c]
            good, bad = np.where(ok, mid, good), np.where(ok, bad, mid)
        Tc, fgc = laws(ci, good)
        i, D, T, fg = (np.concatenate(pair) for pair in ((i, ci), (D, good), (T, Tc), (fg, fgc)))
    key = np.where((T <= limits[0]) & (fg <= max_forgetting), 6 * N * D if target_loss is not None else T, np.inf)
    o = np.lexsort((key, i))
    o = o[np.unique(i[o], return_index=True)[1]]  # each r's best candidate
    feasible = np.isfinite(key[o])
    if not feasible.any():
        raise ScalingError("no replay ratio and token budget meet these constraints under this law")
    D, T, fg = (np.where(feasible, a[o], np.nan) for a in (D, T, fg))
    C = 6 * N * D
    b = int(np.lexsort((T, C) if target_loss is not None else (C, T))[0])  # the last key first, NaN last; ties: by T, C
    frontier = dict(r=r, D=D, compute=C, target_loss=T, forgetting=fg, feasible=feasible)
    best = {k: float(v[b]) for k, v in frontier.items() if k != "feasible"}
    return dict(best=best, base_loss_before=base_loss_before, frontier={k: v.tolist() for k, v in frontier.items()})


# -----------------------------------------------------------------------------
# commands

@contextlib.contextmanager
def _figure(path, ncols):  # yields a row of ncols axes; saved to a temporary name, then renamed
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4), squeeze=False)
    yield axes[0]
    fig.tight_layout()
    save_figure(fig, path, dpi=120, format="png", bbox_inches="tight")

def _json(obj):  # NaN is not JSON: report it as null
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_json(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(map(_json, obj)) + "]"
    return "null" if isinstance(obj, float) and not math.isfinite(obj) else json.dumps(obj)

def _load_fit(path):
    try:
        return Fit.from_json(_read_json(path))
    except ScalingError as e:
        raise ScalingError(f"{path}: {e}")

def _plot_pred(ax, pred, actual, label):
    ax.scatter(actual, pred, s=12, label=label)
    lo, hi = min(np.min(pred), np.min(actual)), max(np.max(pred), np.max(actual))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="actual loss", ylabel="predicted loss")

def cmd_fit(law, data, bootstrap, json, plot):
    if bootstrap < 0:
        raise ScalingError(f"--bootstrap must be >= 0, got {bootstrap}")
    cols = read_csv(data, _law(law).inputs + ("loss",))
    fit = fit_law(law, cols, cols["loss"], bootstrap=bootstrap)
    if json:  # this is also the file format `optimal` and `plan` read
        print(_json(fit.to_json()))
    else:
        print(f"{law} fitted to {fit.n} points, summed Huber {fit.loss:.6g}")
        for k, v in fit.params.items():
            print(f"  {k:>6} = {v:.6g}" + (f"   95% CI [{fit.ci[k][0]:.4g}, {fit.ci[k][1]:.4g}]" if fit.ci else ""))
    if plot:
        with _figure(plot, 1) as axes:
            _plot_pred(axes[0], fit.predict(**cols), cols["loss"], law)

def compute_optimal(params, compute):
    """(N_opt, D_opt) of a Chinchilla law at compute C ≈ 6ND (Hoffmann et al. 2022, Eq. 4):
    N_opt = G·(C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β)), D_opt = C/(6·N_opt); C may be an array."""
    a, b = params["alpha"], params["beta"]
    N = (a * params["A"] / (b * params["B"])) ** (1 / (a + b)) * (np.asarray(compute, float) / 6) ** (b / (a + b))
    return N, np.asarray(compute, float) / (6 * N)


def cmd_optimal(fit, compute, json):
    f = _load_fit(fit)
    if f.law != "chinchilla" or not compute > 0:
        raise ScalingError(f"optimal needs a chinchilla fit ({fit} holds {f.law}) and a positive --compute")
    N, D = (float(v) for v in compute_optimal(f.params, compute))
    out = dict(compute=compute, N=N, D=D, D_over_N=D / N, loss=float(f.predict(N=N, D=D)[0]))
    print(_json(out) if json else "  ".join(f"{k}={v:.4g}" for k, v in out.items()))

def cmd_cpt(data, train_ptpp, test_ptpp, save, json, plot):
    runs = load_cpt(data)
    near = lambda ps: np.any([np.abs(runs["ptpp"] - p) <= 0.01 * p for p in ps], axis=0)  # PTPPs match to 1%
    for p in train_ptpp + test_ptpp:
        if not near([p]).any():
            have = ", ".join(f"{v:g}" for v in np.unique(runs["ptpp"]))
            raise ScalingError(f"no run in {data} has PTPP {p:g} (it has {have})")
    train, test = near(train_ptpp), near(test_ptpp)
    report, fits, preds = {}, {}, {}
    for law, loss in itertools.product(CPT_LAWS, ("target", "base")):
        share = 1 - runs["replay"] if loss == "target" else runs["replay"]  # share of the modelled domain
        cols = dict(N=runs["N"], D=runs["D"], r=share, ptpp=runs["ptpp"])
        fit = fit_law(law, {k: v[train] for k, v in cols.items()}, runs[loss + "_loss"][train])
        preds[law, loss] = fit.predict(**{k: v[test] for k, v in cols.items()})
        before = runs[loss + "_loss_before"][test] if loss + "_loss_before" in runs else None
        m = metrics(preds[law, loss], runs[loss + "_loss"][test], before)
        report.setdefault(law, {})[loss] = dict(m, params=fit.params)
        fits.setdefault(law, {})[loss] = fit.to_json()
    if save:  # the file `plan --fit=` reads; a temporary name, then rename: nothing half-written looks complete
        with atomic(save) as tmp, open(tmp, "w") as fh:
            fh.write(_json(fits))
    if json:
        print(_json(dict(train_ptpp=train_ptpp, test_ptpp=test_ptpp, n_train=int(train.sum()), n_test=int(test.sum()),
                         laws=report)))
    else:
        print(f"fit on PTPP {train_ptpp} ({train.sum()} runs), predict PTPP {test_ptpp} ({test.sum()} runs)")
        print(f"{'law':<14} {'loss':<7} {'huber_log':>10} {'MAE_rel':>8} {'slope':>6} {'RMSE':>8} {'MAPE%':>6}")
        fmt = lambda v, f: "-" if v is None else format(v, f)
        for law, loss in preds:
            m = report[law][loss]
            print(f"{law:<14} {loss:<7} {m['huber_on_log']:>10.3g} {fmt(m['mae_rel'], '.3f'):>8} "
                  f"{fmt(m['calibration_slope'], '.2f'):>6} {m['rmse']:>8.4f} {m['mape']:>6.2f}")
    if plot:
        with _figure(plot, 2) as axes:
            for ax, loss in zip(axes, ("target", "base")):
                for law in CPT_LAWS:
                    _plot_pred(ax, preds[law, loss], runs[loss + "_loss"][test], law)
                ax.set_title(f"{loss} loss at PTPP {', '.join(f'{p:g}' for p in test_ptpp)}")
                ax.legend()

def cmd_plan(fit, law, N, ptpp, target_loss, max_forgetting, max_compute, base_loss_before, json, plot):
    if len(fit.split(",")) == 2:  # two `fit --json` files: target law, base law
        target, base = map(_load_fit, fit.split(","))
    else:  # a bundle written by `cpt --save`
        bundle = _read_json(fit)
        pair = bundle.get(law) if isinstance(bundle, dict) else None
        if not isinstance(pair, dict) or not {"target", "base"} <= pair.keys():
            raise ScalingError(f"{fit} is not a `cpt --save` file with law {law!r}; give that or two fit files")
        target, base = Fit.from_json(pair["target"]), Fit.from_json(pair["base"])
    if target_loss is None and max_compute is None:
        raise ScalingError("plan needs --target_loss (least compute) or --max_compute (least loss)")
    if not N > 0 or (ptpp is None and "ptpp" in _law(target.law).inputs + _law(base.law).inputs):
        raise ScalingError(f"plan needs a positive --N and, for law {target.law}, the base model's --ptpp")
    res = plan(target, base, N, ptpp, target_loss, max_forgetting, max_compute, base_loss_before)
    b, fr = res["best"], res["frontier"]
    if json:
        print(_json(res))
    else:
        print(f"{'r':>5} {'D':>10} {'compute':>10} {'target':>8} {'forget':>8}")
        for i in range(0, len(fr["r"]), len(fr["r"]) // 20):
            print(f"{fr['r'][i]:>5.2f} {fr['D'][i]:>10.4g} {fr['compute'][i]:>10.4g} {fr['target_loss'][i]:>8.4f} "
                  f"{fr['forgetting'][i]:>8.4f}" + ("" if fr["feasible"][i] else "  (infeasible)"))
        print(f"best: replay r = {b['r']:.3f}, D = {b['D']:.4g} tokens, compute = {b['compute']:.4g} FLOPs, "
              f"target loss {b['target_loss']:.4f}, forgetting {b['forgetting']:.4f}")
    if plot:
        with _figure(plot, 2) as axes:
            for ax, k in zip(axes, ("compute" if target_loss is not None else "target_loss", "forgetting")):
                ax.plot(fr["r"], fr[k])
                ax.plot([b["r"]], [b[k]], "r*", ms=12)
                ax.set(xlabel="replay ratio r", ylabel=k, yscale="log" if k == "compute" else "linear")
            if math.isfinite(max_forgetting):
                axes[1].axhline(max_forgetting, color="k", ls="--", lw=0.8)

def floats(text):
    return [float(v) for v in text.split(",")]

def main(argv):
    """Run one command; a user error prints one sentence and returns 2."""
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("fit", help="fit a law to a CSV of points")
    c.add_argument("--law", required=True, help=", ".join(LAWS))
    c.add_argument("--data", required=True, help="CSV of the law's inputs and loss")
    c.add_argument("--bootstrap", type=int, default=0, help="resamples for 95%% confidence intervals")
    c = sub.add_parser("optimal", help="compute-optimal N and D of a chinchilla fit")
    c.add_argument("--fit", required=True, help="a `fit --json` file")
    c.add_argument("--compute", type=float, required=True, help="training FLOPs")
    c = sub.add_parser("cpt", help="fit the CPT laws on some PTPPs and score their forecasts at others")
    c.add_argument("--data", required=True, help="CSVs or run directories, comma-separated")
    c.add_argument("--train_ptpp", type=floats, required=True, help="PTPPs to fit on, comma-separated")
    c.add_argument("--test_ptpp", type=floats, required=True, help="PTPPs to forecast, comma-separated")
    c.add_argument("--save", help="write the fits to this JSON file (what `plan --fit` reads)")
    c = sub.add_parser("plan", help="replay ratio and CPT tokens: least compute to a target loss, or least loss")
    c.add_argument("--fit", required=True, help="a `cpt --save` file, or target.json,base.json from `fit --json`")
    c.add_argument("--law", default="ptpp_transfer", help="the law to take from a `cpt --save` file")
    c.add_argument("--N", type=float, required=True, help="base model parameters")
    c.add_argument("--ptpp", type=float, help="the base model's pre-training tokens per parameter")
    c.add_argument("--target_loss", type=float, help="least compute reaching this target-domain loss")
    c.add_argument("--max_forgetting", type=float, default=math.inf, help="base-domain loss rise allowed")
    c.add_argument("--max_compute", type=float, help="least target loss within these FLOPs")
    c.add_argument("--base_loss_before", type=float, help="the base model's base-domain loss")
    for name, c in sub.choices.items():
        c.add_bool("--json", help="print the result as JSON")
        if name != "optimal":
            c.add_argument("--plot", help="write a figure to this PNG")
    try:
        args = vars(p.parse_args(argv))
    except SystemExit as e:  # argparse has printed --help (0) or a one-line error (2)
        return e.code
    try:
        dict(fit=cmd_fit, optimal=cmd_optimal, cpt=cmd_cpt, plan=cmd_plan)[args.pop("command")](**args)
    except ScalingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
