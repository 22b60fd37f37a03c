"""
Experiment 4 — a Chinchilla-form scaling law (SPEC §5) fitted to the final losses of the collapse family
(experiment 3's τ_opt runs at TPP 20, both seeds) plus the same recipe at TPP 5 and 60, and the compute-optimal
tokens per parameter it implies.

    python experiments/scaling_law.py [--quick]

Claim (Hoffmann et al. 2022; Besiroglu et al. 2024): L(N, D) = E + A/N^α + B/D^β fits final losses, and the
compute-optimal D/N is ≈20 (Besiroglu's refit: α 0.348, β 0.366).
"""
import time

import numpy as np

from common import family_flags, plt, quick, read_run, save_json, savefig, train_run  # noqa: I001 (sets sys.path)
import scaling

GRID = {5.0: [16, 24] if quick() else [16, 24, 32, 48], 60.0: [16] if quick() else [16, 24, 32],
        20.0: [16, 24] if quick() else [16, 24, 32, 48]}
SEEDS = {20.0: [0, 1]}            # TPP 20 = experiment 3's family, which has two seeds

t0 = time.time()
pts = []
for tpp, widths in GRID.items():
    for w in widths:
        for s in SEEDS.get(tpp, [0]):
            name = f"collapse/opt_w{w}_s{s}" if tpp == 20.0 else f"scaling/tpp{tpp:g}_w{w}_s{s}"
            cfg, _, evals = read_run(train_run(name, **family_flags(w, s, tpp, tau="opt")))
            pts.append(dict(run=name, w=w, tpp=tpp, seed=s, N=cfg["N"], D=cfg["D"], loss=evals[-1]["val"]["prose"]))
            print(f"  {name}: N={cfg['N']:,} D={cfg['D']:,} val {pts[-1]['loss']:.4f}")

N, D, L = (np.array([p[k] for p in pts], float) for k in ("N", "D", "loss"))
fit = scaling.fit_law("chinchilla", {"N": N, "D": D}, L, bootstrap=0 if quick() else 200)
p = fit.params
print("fit:", {k: round(v, 4) for k, v in p.items()}, "CI:", fit.ci)


def law(N, D):   # L = E + A/N^α + B/D^β from the reported parameters; computed here because scaling.Fit.predict
    # rejects its own fit when E underflows to exactly 0.0 (log_E → −∞), see REPORT.md "Bugs found"
    return p["E"] + p["A"] * np.asarray(N, float) ** -p["alpha"] + p["B"] * np.asarray(D, float) ** -p["beta"]


pred = law(N, D)
rel_err = pred / L - 1


def optimal(C):   # SPEC §5: N_opt = G (C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β)), D_opt = C/(6 N_opt)
    a, b = p["alpha"], p["beta"]
    G = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
    n = G * (C / 6) ** (b / (a + b))
    return n, C / (6 * n)


# sensitivity: count the (tied) embedding too, as Chinchilla does; at d = 16 it is 257·16 = 4,112 = 63% of N
N_tot = N + np.array([257 * q["w"] for q in pts], float)
fit_tot = scaling.fit_law("chinchilla", {"N": N_tot, "D": D}, L)
print("fit with embeddings counted:", {k: round(v, 4) for k, v in fit_tot.params.items()})

C_range = [6 * n * d for n, d in zip(N, D)]
opt = [{"C": float(c), "N_opt": float(optimal(c)[0]), "TPP_opt": float(optimal(c)[1] / optimal(c)[0])}
       for c in np.geomspace(min(C_range), max(C_range), 5)]
p_main, p = p, fit_tot.params
opt_tot = [{"C": float(c), "N_opt": float(optimal(c)[0]), "TPP_opt": float(optimal(c)[1] / optimal(c)[0])}
           for c in np.geomspace(min(C_range), max(C_range), 5)]
p = p_main
for o in opt_tot:
    print(f"(embeddings counted) C={o['C']:.3g}: N_opt={o['N_opt']:,.0f}, compute-optimal TPP {o['TPP_opt']:.1f}")
for o in opt:
    print(f"C={o['C']:.3g}: N_opt={o['N_opt']:,.0f}, compute-optimal TPP {o['TPP_opt']:.1f}")

P = plt()
fig, axes = P.subplots(1, 2, figsize=(11, 4))
Ns = np.geomspace(N.min() / 1.5, N.max() * 1.5, 50)
for i, tpp in enumerate(GRID):
    sel = np.array([q["tpp"] == tpp for q in pts])
    axes[0].scatter(N[sel], L[sel], color=f"C{i}", label=f"TPP {tpp:g}")
    axes[0].plot(Ns, law(Ns, tpp * Ns), color=f"C{i}", lw=1)
axes[0].set_xscale("log")
axes[0].set_xlabel("N (non-embedding params)")
axes[0].set_ylabel("final val loss (prose, nats/byte)")
axes[0].set_title(f"E={p['E']:.3f} A={p['A']:.3g} α={p['alpha']:.3f} B={p['B']:.3g} β={p['beta']:.3f}")
axes[0].legend()
axes[1].plot([o["C"] for o in opt], [o["TPP_opt"] for o in opt], marker="o", label="fit on non-embedding N")
axes[1].plot([o["C"] for o in opt_tot], [o["TPP_opt"] for o in opt_tot], marker="s", label="fit on N + embedding")
axes[1].set_yscale("log")
axes[1].axhline(20, color="gray", ls=":", label="Chinchilla ≈20")
axes[1].set_xscale("log")
axes[1].set_xlabel("compute C = 6ND (FLOPs)")
axes[1].set_ylabel("compute-optimal D/N")
axes[1].legend()
savefig(fig, "scaling_law")
save_json("scaling_law", {"points": [dict(q, pred=float(pr)) for q, pr in zip(pts, pred)], "fit": p, "ci": fit.ci,
                          "huber_sum": fit.loss, "max_abs_rel_err": float(np.abs(rel_err).max()),
                          "optimal": opt, "fit_with_embeddings": fit_tot.params, "optimal_with_embeddings": opt_tot, "wall_s": time.time() - t0})
print(f"done in {time.time() - t0:.0f}s")
