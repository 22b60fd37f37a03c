"""Shared helpers for the reproduction scripts: run train.py in-process unless the run is already finished,
read a run's log, write results JSON and PNG plots. Every experiment script is resumable through `train_run`."""
import contextlib
import io
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICK = "--quick" in sys.argv[1:]   # a smoke test: its own folders, so it never mixes with the real runs
RUNS = os.path.join(HERE, "runs_quick" if QUICK else "runs")
RESULTS = os.path.join(HERE, "results_quick" if QUICK else "results")
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # train.py resolves data_dir="data" relative to the repo root

import torch  # noqa: E402

# 1 thread: on this shared 2-core machine a tiny model ran 3-8x faster with 1 thread than with 2 (measured)
torch.set_num_threads(1)
import train  # noqa: E402
from configurator import atomic, save_figure  # noqa: E402


def read_run(run_dir):
    """(config, training lines, eval lines) of a run directory."""
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "log.jsonl")) if l.strip()]
    return cfg, [l for l in lines if "loss" in l], [l for l in lines if "val" in l]


def finished(run_dir):
    """A run is finished when its log ends with the eval line of its last step (config.json's steps; T in older
    runs)."""
    try:
        cfg, _, evals = read_run(run_dir)
    except (OSError, ValueError):
        return False
    return bool(evals) and evals[-1]["step"] == cfg.get("steps", cfg.get("T")) and bool(train.checkpoints(run_dir))


def train_run(name, **flags):
    """Train experiments/runs/<name> with train.py's --key=value flags unless it is finished; a run that
    stopped part-way resumes from its last checkpoint. Returns the run directory."""
    out = os.path.join(RUNS, name)
    if finished(out):
        return out
    if train.checkpoints(out):
        argv = [f"--out_dir={out}", "--init_from=resume"] + ([f"--collapse_ref={flags['collapse_ref']}"]
                                                              if "collapse_ref" in flags else [])
    else:
        flags.setdefault("sample_tokens", 0)
        argv = [f"--out_dir={out}"] + [f"--{k}={v}" for k, v in flags.items()]
    t0 = time.time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        train.main(argv)
    cfg = json.load(open(os.path.join(out, "config.json")))
    alerts = [l for l in buf.getvalue().splitlines() if "collapse monitor" in l]
    print(f"  trained {name}: N={cfg['N']:,} D={cfg['D']:,} in {time.time() - t0:.0f}s" +
          (f" ({len(alerts)} monitor alerts)" if alerts else ""), flush=True)
    return out


def save_json(name, obj):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name + ".json")
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def savefig(fig, name):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name + ".png")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return path


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def quick():
    return QUICK


# non-embedding parameters of the depth-2 width family below (measured: SwiGLU width floor(8/3·d))
FAMILY_N = {16: 6568, 24: 14560, 32: 25492, 48: 56768}


def family_flags(w, seed, tpp, lr=2 ** -6, **extra):
    """The Celerity-style recipe of experiments 3-5 at width w: depth 2, CompleteP (d_base 16, L_base 2), prose,
    TPP fixed, linear decay to zero with 10% warmup, one batch of 1,024 tokens (8 × 128) at every size so that even
    the smallest run has ≈100+ steps; pass tau="opt" for τ = τ_opt(TPP) or weight_decay=λ for a fixed λ."""
    T = int(tpp * FAMILY_N[w] / 1024) + 1
    f = dict(n_layer=2, n_head=4, n_embd=w, param="completep", d_base=16, L_base=2, lr=lr, tpp=tpp,
             batch_tokens=1024, seq_len_schedule=128, schedule="d2z", warmup=0.1, data="prose",
             eval_batches=16, seed=seed, log_interval=max(1, T // 200), eval_interval=max(1, T // 4))
    f.update(extra)
    return f


# --- the recipe of experiments 3 and 4 (second version): TPP counted on all parameters, validation curves -------
# Kept apart from family_flags above (experiment 5, cpt.py, still trains its bases with that one).
VOCAB = 257   # byte tokenizer; the token embedding is tied with the output layer, so it is counted once


def n_params(w, n_layer=2):
    """(non-embedding N, N + embedding) of the depth-n_layer, 4-head CompleteP model of width w, as train.py
    builds it."""
    from model import GPT, get_preset
    m = GPT(get_preset("tiny", n_layer=n_layer, n_head=4, n_embd=w, param="completep", d_base=16, L_base=2))
    return m.num_params(), m.num_params(non_embedding=False)


def recipe_flags(w, seed, tpp, lr=2 ** -6, n_layer=2, batch=1024, evals=50, tau="opt", steps=None, quantum=1024,
                 **extra):
    """Experiments 3-4's recipe at width w: CompleteP (d_base 16, L_base 2), prose, D = TPP × (N + embedding) rounded
    up to whole batches of `batch` tokens (sequences of 128), linear decay to zero after 10% warm-up, τ = τ_opt(TPP)
    for every decayed group (train.py --tau: λ_g = B/(η_g·τ·D)), validation loss on 8 fixed windows of 1,024 tokens
    evaluated ≈`evals` times per run (the collapse curves and train.py's live monitor), training loss logged ≈200
    times.
    tau: "opt", a number, or None to use weight_decay=… from extra (a fixed λ). steps: instead of a fixed batch, the
    batch (a multiple of `quantum` tokens, 1,024 or one sequence of 128, accumulated in micro-batches of at most
    1,024) that gives about this many steps at every size; evaluation windows do not depend on the batch."""
    import math
    import mup
    _, n_tot = n_params(w, n_layer)
    if steps:
        batch = max(quantum, round(tpp * n_tot / steps / quantum) * quantum)
        seqs = batch // 128
        if seqs > 8:   # whole multiples of m ≤ 8 sequences (step count within ±6%), so no prime batch runs 1 by 1
            m = min(8, 2 ** int(math.log2(seqs / 8)))
            seqs = max(m, round(seqs / m) * m)
            batch = 128 * seqs
        # micro-batches of at most 8 sequences (1,024 tokens) that divide the batch
        extra.setdefault("micro_batch_tokens", 128 * max(k for k in range(1, 9) if seqs % k == 0))
    T = math.ceil(tpp * n_tot / batch)
    f = dict(n_layer=n_layer, n_head=4, n_embd=w, param="completep", d_base=16, L_base=2, lr=lr, tokens=T * batch,
             batch_tokens=batch, seq_len_schedule="128", schedule="d2z", warmup=0.1, data="prose", eval_batches=8,
             seed=seed, log_interval=max(1, T // 200), eval_interval=max(1, round(T / evals)))
    if tau is not None:
        f["tau"] = f"{mup.tau_opt(tpp):.6g}" if tau == "opt" else f"{float(tau):.6g}"
    f.update(extra)
    return f


def val_curve(run_dir, tpp=None, domain="prose"):
    """A run's validation-loss curve as a collapse.Curve: x = tokens/D, size = N + embedding, tpp = D/(N + embedding)
    unless given; the points after step 0."""
    import numpy as np
    import collapse
    import mup
    cfg, _, evals = read_run(run_dir)
    n_tot = cfg["N"] + VOCAB * cfg["n_embd"]
    ev = [e for e in evals if e["step"] > 0]
    steps = np.array([e["step"] for e in ev], float)
    n_steps = cfg.get("steps", cfg.get("T"))  # config.json's step count ("T" in runs made before it was renamed)
    eta = mup.lr_factor(steps, n_steps, cfg["schedule"], cfg["warmup"], cfg["final_lr_frac"], cfg["wsd_decay"])
    c = collapse.Curve(os.path.basename(os.path.normpath(run_dir)), steps * cfg["B"] / cfg["D"],
                       np.array([e["val"][domain] for e in ev], float), float(n_tot), cfg["seed"], cfg["schedule"],
                       tpp or cfg["D"] / n_tot, cfg["tau"], cfg["warmup"], eta / max(eta.max(), 1e-30),
                       {"steps": n_steps})
    c.B = cfg["B"]   # tokens per step, for the CSV
    return c


def write_curves_csv(curves, path):
    """Long CSV in the format `python collapse.py analyze --runs=PATH` reads: run, tokens, step, loss, size (N +
    embedding), seed, schedule, tpp, tau, lr (relative to the peak); x = tokens / the run's last tokens."""
    import csv
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["run", "tokens", "step", "loss", "size", "seed", "schedule", "tpp", "tau", "lr"])
        for c in curves:
            T = c.lr_args["steps"]
            for x, l, e in zip(c.x, c.loss, c.eta):
                wr.writerow([c.name, round(x * T) * c.B, round(x * T), f"{l:.6f}", int(c.size), c.seed, c.schedule,
                             f"{c.tpp:.6g}", f"{c.tau:.6g}", f"{e:.6g}"])
    return path


def window_stats(curves, offset, xs, window=1):
    """collapse.analyze (Δ, σ) plus experiment 3's summary over the supercollapse window xs: the Δ/σ ratio's mean
    and max, where Δ ≤ σ holds from, ℓ(0.5) by size; returns it and the arrays."""
    import numpy as np
    import collapse as C
    res = C.analyze(curves, offset=offset, window=window, force=True)
    grid, L, ell, delta, sigma = res.pop("arrays")
    sel = (grid >= xs[0]) & (grid <= xs[1])
    at = lambda a, x: float(np.interp(x, grid, a))
    res["ell05_by_size"] = {str(int(s)): float(np.mean([at(e, 0.5) for c, e in zip(curves, ell) if c.size == s]))
                            for s in sorted({c.size for c in curves})}
    if sigma is not None:
        r = delta[sel] / sigma[sel]
        above = np.nonzero(delta[:-1] > sigma[:-1])[0]   # Δ ≤ σ from this x to the end (x = 1 excluded: Δ(1) = 0)
        res.update(supercollapse_from_x=float(grid[above[-1] + 1]) if len(above) else float(grid[0]))
        res.update(ratio_mean=float(r.mean()), ratio_max=float(r.max()), frac_below=float(np.mean(r <= 1)),
                   delta_mean=float(delta[sel].mean()), sigma_mean=float(sigma[sel].mean()),
                   delta_at={str(x): at(delta, x) for x in (0.5, 0.75, 0.9)},
                   sigma_at={str(x): at(sigma, x) for x in (0.5, 0.75, 0.9)})
    return res, (grid, L, ell, delta, sigma)
