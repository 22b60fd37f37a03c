"""
Parameterisations of the GPT in model.py: standard (SP), µP and CompleteP.

A parameterisation says, for every weight of a model of width d and depth L, how it is initialised, what
multiplier it meets in the forward pass, and which AdamW learning rate, weight decay and epsilon it gets, all
as a function of base hyper-parameters tuned once on a small proxy (width d_base, depth L_base). Under µP the
best hyper-parameters of the proxy stay the best as width grows (µTransfer); CompleteP extends that to depth.
The one table this file implements (docs/science.md §2) comes from Yang et al. 2022 "Tensor Programs V", the
Cerebras µP guide and BTLM-3B-8K (Dey et al. 2023 §3.2), and CompleteP (Dey et al. 2025 "Don't be lazy", α = 1).

    python mup.py coord --param=mup --widths=64,128,256,512 --steps=10 --plot=coord.png --json
    python mup.py coord --param=completep --depths=2,4,8,16 --json

runs the coordinate check: every curve of mean |activation| against width is flat under µP and grows under SP.
"""
import math
import sys
from dataclasses import dataclass

import numpy as np

from configurator import ArgumentParser

PARAMS = ("sp", "mup", "completep")

# BTLM-3B-8K's tuned µP base values (Dey et al. 2023, BTLM-3B-8K): the defaults of every model here
BTLM_SIGMA, BTLM_ETA, BTLM_ALPHA_IN, BTLM_ALPHA_OUT, BTLM_D_BASE = 0.073, 1.2e-2, 14.6, 2.22, 256


class MupError(ValueError):
    """A parameterisation asked for with values that make no sense (one sentence)."""


@dataclass(frozen=True)
class Parameterisation:
    """The parameterisation table for one model. m_N = d/d_base is `width_mult`, m_L = L/L_base is `depth_mult`."""
    name: str            # "sp" | "mup" | "completep"
    width_mult: float    # m_N
    depth_mult: float    # m_L
    n_layer: int         # L
    sigma: float         # base init std σ
    alpha_in: float      # embedding multiplier α_in
    alpha_out: float     # output-logit multiplier α_out

    @classmethod
    def from_config(cls, c):
        """Build from anything with the GPTConfig fields param, n_embd, n_layer, d_base, L_base, sigma, alpha_*."""
        if c.param not in PARAMS:
            raise MupError(f"unknown parameterisation {c.param!r}; choose one of {', '.join(PARAMS)}")
        if c.d_base <= 0 or c.L_base <= 0:
            raise MupError(f"d_base and L_base must be positive, got d_base={c.d_base}, L_base={c.L_base}")
        return cls(c.param, c.n_embd / c.d_base, c.n_layer / c.L_base, c.n_layer, c.sigma, c.alpha_in, c.alpha_out)

    # ---- forward multipliers ---------------------------------------------------------------------------------
    @property
    def embedding_mult(self):
        return 1.0 if self.name == "sp" else self.alpha_in

    @property
    def logit_mult(self):
        # µP readout α_out/m_N, applied exactly once (here, in GPT.forward); the tied weight itself stays at σ
        return 1.0 if self.name == "sp" else self.alpha_out / self.width_mult

    @property
    def attn_scale_power(self):
        # q·k/d_head under µP (keys and queries become correlated during training), q·k/√d_head under SP
        return 0.5 if self.name == "sp" else 1.0

    @property
    def residual_mult(self):
        # CompleteP: x + F(LN(x))/m_L, so each block's contribution shrinks as depth grows (α = 1)
        return 1.0 / self.depth_mult if self.name == "completep" else 1.0

    # ---- initialisation ----------------------------------------------------------------------------------------
    def init_std(self, kind):
        """Init std of a weight of `kind`: "embedding", "hidden" or "residual_out" (attn and MLP c_proj)."""
        s, mN, L = self.sigma, self.width_mult, self.n_layer
        if kind == "embedding":
            return s  # tied with the readout: keep it at σ, never rescale it with width
        if kind == "hidden":
            return s if self.name == "sp" else s / math.sqrt(mN)
        if kind == "residual_out":
            return {"sp": s / math.sqrt(2 * L), "mup": s / math.sqrt(mN * 2 * L),
                    "completep": s / math.sqrt(mN)}[self.name]
        raise MupError(f"unknown weight kind {kind!r}")

    # ---- optimizer ---------------------------------------------------------------------------------------------
    def lr_mult(self, kind):
        """Each group's LR as a multiple of the base η; an LR schedule scales every group by the same factor."""
        if kind in ("hidden", "residual_out") and self.name != "sp":
            return 1.0 / self.width_mult  # η/m_N (CompleteP's extra m_L^(α−1) is 1 at α = 1)
        return 1.0

    def weight_decay(self, kind, weight_decay, width_scaled=False):
        """A group's coupled AdamW λ. PyTorch's AdamW shrinks weights by η_g·λ_g a step, so a group's timescale
        is τ_g = B/(η_g·λ_g·D). Hidden matrices train at η/m_N; giving them λ·m_N keeps η_g·λ_g, hence τ_g, equal
        to the base group's at every width. CompleteP does so always (Dey et al. 2025, Table 1), and so does
        microsoft/mup's MuAdam with coupled decay; µP does it when width_scaled (train.py's --tau). BTLM's own
        µP recipe keeps λ unscaled (Dey et al. 2023, §3.2), so there the hidden matrices' τ is m_N times the base."""
        if kind in ("vector", "final_norm"):
            return 0.0  # no decay on LayerNorm gains and biases
        if kind in ("hidden", "residual_out") and (self.name == "completep" or width_scaled):
            return weight_decay / self.lr_mult(kind)  # λ·m_N under µP and CompleteP, λ under SP
        return weight_decay

    def eps(self, kind, eps):
        """CompleteP's AdamW ε (Dey et al. 2025, Eq. 40, as its reference nanoGPT-mup `completep` branch applies
        it since January 2025): ε/(m_N·m_L^α) for every parameter inside the blocks, ε/m_N for the embedding and
        the final LayerNorm. SP and BTLM's µP keep ε."""
        if self.name != "completep":
            return eps
        inside = kind in ("hidden", "residual_out", "vector")
        return eps / (self.width_mult * (self.depth_mult if inside else 1.0))


def weight_kind(name, p):
    """Which row of the parameterisation table a named parameter of model.GPT belongs to."""
    if p.dim() < 2:
        return "final_norm" if "ln_f" in name else "vector"  # the final LN sits outside the blocks (CompleteP ε)
    if "wte" in name or "lm_head" in name:
        return "embedding"
    if name.endswith("c_proj.weight"):
        return "residual_out"
    return "hidden"


def init_param(pz, name, p):
    """Initialise one parameter (or a full-size tensor standing in for it) by its kind: LayerNorm gains 1, biases
    0, matrices normal with the parameterisation's std. train.py calls it on whole parameters one at a time to fill
    a model that FSDP has sharded (built on the meta device), so every strategy starts from the same weights."""
    import torch
    kind = weight_kind(name, p)
    if kind in ("vector", "final_norm"):
        is_gain = "ln_" in name and name.endswith(".weight")  # LayerNorm gains start at 1, biases at 0
        torch.nn.init.ones_(p) if is_gain else torch.nn.init.zeros_(p)
    else:
        torch.nn.init.normal_(p, mean=0.0, std=pz.init_std(kind))


def init_weights(model):
    """Initialise every parameter of a model.GPT according to its parameterisation (biases and LN as usual)."""
    for name, p in model.named_parameters():
        init_param(model.pz, name, p)


def param_groups(model, lr, weight_decay, eps=1e-8, width_scaled_wd=False):
    """AdamW param groups: one per weight kind, each with its own lr, weight_decay, eps and `lr_mult`."""
    pz, groups = model.pz, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = weight_kind(name, p)
        if kind not in groups:
            m = pz.lr_mult(kind)
            groups[kind] = dict(params=[], name=kind, lr=lr * m, lr_mult=m, eps=pz.eps(kind, eps),
                                weight_decay=pz.weight_decay(kind, weight_decay, width_scaled_wd))
        groups[kind]["params"].append(p)
    return list(groups.values())


def group_taus(groups, batch, tokens):
    """Each group's AdamW timescale τ_g = B/(η_g·λ_g·D) at its peak LR (None where λ_g = 0)."""
    return {g["name"]: tau(g["lr"], g["weight_decay"], batch, tokens) if g["weight_decay"] > 0 else None
            for g in groups}


# -----------------------------------------------------------------------------------------------------------------
# The AdamW timescale and the Power Lines laws (Bergsma et al. 2025, "Power Lines", arXiv 2505.13738; "Scaling with
# Collapse", arXiv 2509.25087 §2). AdamW's weights are an exponential moving average of updates with rate η·λ, so
# τ_iter = 1/(η·λ) steps; as a fraction of a run of D/B steps, τ = B/(η·λ·D). η and λ are a group's own: under µP
# and CompleteP the τ that matters is the hidden matrices' (they hold almost all parameters).

def tau(lr, weight_decay, batch, tokens):
    """AdamW timescale as a fraction of the run, τ = B/(η·λ·D) = 1/(η·λ·steps); B and D in the same unit."""
    return batch / (lr * weight_decay * tokens)


def weight_decay_for_tau(tau, lr, batch, tokens):
    """The λ that gives a group of LR η the timescale τ: λ = B/(η·τ·D)."""
    return batch / (lr * tau * tokens)


def tau_opt(tpp):
    """Power Lines' optimal timescale for pre-training at TPP tokens per parameter: τ_opt = 1.084 · TPP^(−0.527)."""
    return 1.084 * tpp ** -0.527


def batch_opt(tokens, in_tokens=False):
    """Power Lines: B_opt = 0.0306 · D^0.383 sequences of 2,048 tokens (D in tokens); in_tokens=True: tokens."""
    b = 0.0306 * tokens ** 0.383
    return b * 2048 if in_tokens else b


# -----------------------------------------------------------------------------------------------------------------
# The LR schedule: one function for training (train.py) and for the curve shapes of collapse.py

SCHEDULES = ("linear", "d2z", "cosine", "constant", "wsd")


def lr_factor(step, steps, schedule, warmup=0.0, final_lr_frac=0.0085, wsd_decay=0.2):
    """The LR at `step` of `steps` as a fraction of the peak (a number, or an array for an array of steps): linear
    warmup over the first `warmup` fraction of steps, then linear to final_lr_frac (BTLM: 0.85%), d2z (linear to
    zero, "Straight to Zero", arXiv 2502.15938), cosine to 10%, constant, or wsd (flat, then linear to zero over
    the last wsd_decay of the run). Every group's LR is its own peak times this factor."""
    if schedule not in SCHEDULES:
        raise MupError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    s = np.asarray(step, dtype=float)
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    p = np.clip((s - warm) / max(1, steps - warm), 0.0, 1.0)  # progress through the decay, 0 → 1
    decay = {"linear": lambda: 1.0 - (1.0 - final_lr_frac) * p, "d2z": lambda: 1.0 - p,
             "cosine": lambda: 0.1 + 0.45 * (1 + np.cos(np.pi * p)), "constant": lambda: np.ones_like(p),
             "wsd": lambda: np.clip((1.0 - s / steps) / wsd_decay, 0.0, 1.0)}[schedule]()
    f = np.where(s < warm, (s + 1) / max(warm, 1), decay)
    return float(f) if f.ndim == 0 else f


# -----------------------------------------------------------------------------------------------------------------
# Coordinate check (Yang et al. 2022, Tensor Programs V §D.1): train a few steps at a high LR on a fixed batch and
# watch mean |activation| against width. Under a correct µP every curve is flat; under SP hidden activations and
# logits grow with width after the first update. The depth variant does the same against depth for CompleteP.

def coord_check(param="mup", widths=(64, 128, 256, 512), depths=None, steps=10, lr=1e-3, n_layer=2, n_embd=128,
                n_head=4, seq_len=64, batch_size=8, seed=0):
    """Returns {"param", "widths" or "depths", "records": {kind: [[mean|x| per step] per size]}, "slopes": {...}}.

    A record is mean |activation| of: the embedding output, each attention output and each MLP output (before
    they join the residual stream, max over layers), the last block's output ("residual") and the logits.
    slopes[kind] = max over steps ≥ 1 of |d log(mean|x|) / d log(size)| (least-squares fit).
    """
    import torch
    from model import GPT, GPTConfig
    if param not in PARAMS:
        raise MupError(f"unknown parameterisation {param!r}; choose one of {', '.join(PARAMS)}")
    sizes = list(depths) if depths else list(widths)
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise MupError(f"need at least two positive {'depths' if depths else 'widths'}, got {sizes}")
    # the head count stays fixed and the head dimension grows with width, so ALiBi's per-head slopes (which
    # depend on the number of heads) are the same at every width
    if not depths and any(w % n_head for w in widths):
        raise MupError(f"every width must be a multiple of n_head={n_head}, got {list(widths)}")
    # a fixed batch of real text: this file's own bytes
    text = open(__file__, "rb").read()
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(text) - seq_len - 1, (batch_size,), generator=g)
    data = torch.tensor(list(text), dtype=torch.long)
    x = torch.stack([data[i:i + seq_len] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + seq_len] for i in ix])
    kinds = ("embedding", "attn", "mlp", "residual", "residual_delta", "logits")
    records = {k: [] for k in kinds}
    for size in sizes:
        d, L = (n_embd, size) if depths else (size, n_layer)
        torch.manual_seed(seed)
        cfg = GPTConfig(vocab_size=257, n_layer=L, n_head=n_head, n_embd=d, block_size=seq_len, param=param,
                        d_base=n_embd if depths else min(widths), L_base=min(depths) if depths else L)
        model = GPT(cfg)
        opt = torch.optim.AdamW(param_groups(model, lr, weight_decay=0.0), betas=(0.9, 0.95))
        cur = {}

        def hook(kind):
            def f(module, inputs, output):
                cur[kind] = max(cur.get(kind, 0.0), output.detach().abs().mean().item())
            return f
        model.transformer.wte.register_forward_hook(hook("embedding"))
        for blk in model.transformer.h:
            blk.attn.register_forward_hook(hook("attn"))
            blk.mlp.register_forward_hook(hook("mlp"))
        model.transformer.h[-1].register_forward_hook(hook("residual"))
        h0 = {}

        def delta_hook(module, inputs, output):  # how far the last block's output has moved since initialisation
            h0.setdefault("h", output.detach().clone())
            cur["residual_delta"] = (output.detach() - h0["h"]).abs().mean().item() + 1e-12
        model.transformer.h[-1].register_forward_hook(delta_hook)
        per_step = {k: [] for k in kinds}
        for _ in range(steps + 1):  # step 0 is the forward at initialisation
            cur.clear()
            logits, loss = model(x, y)
            cur["logits"] = logits.detach().abs().mean().item()
            for k in kinds:
                per_step[k].append(cur[k])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for k in kinds:
            records[k].append(per_step[k][:steps + 1])
    logs = [math.log(s) for s in sizes]
    mean_ls = sum(logs) / len(logs)

    def slope(vals):  # least-squares slope of log(val) on log(size)
        lv = [math.log(v) for v in vals]
        mv = sum(lv) / len(lv)
        return sum((a - mean_ls) * (b - mv) for a, b in zip(logs, lv)) / sum((a - mean_ls) ** 2 for a in logs)
    slopes = {k: max(abs(slope([records[k][i][t] for i in range(len(sizes))])) for t in range(1, steps + 1))
              for k in kinds}
    signed = {k: slope([records[k][i][steps] for i in range(len(sizes))]) for k in kinds}
    return {"param": param, ("depths" if depths else "widths"): sizes, "steps": steps, "lr": lr,
            "slopes": slopes, "final_slopes": signed, "records": records}


def plot_coord(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    axis = "depths" if "depths" in result else "widths"
    sizes, recs = result[axis], result["records"]
    fig, axes = plt.subplots(1, len(recs), figsize=(4 * len(recs), 3.5))
    for ax, (kind, per_size) in zip(axes, recs.items()):
        for t in range(0, result["steps"] + 1, max(1, result["steps"] // 4)):
            ax.plot(sizes, [per_size[i][t] for i in range(len(sizes))], marker="o", label=f"step {t}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{kind} (|slope| ≤ {result['slopes'][kind]:.2f})")
        ax.set_xlabel(axis[:-1])
    axes[0].set_ylabel("mean |activation|")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"coordinate check, {result['param']}, lr {result['lr']}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    import os
    os.replace(tmp, path)


def ints(text):
    return tuple(int(v) for v in text.split(","))


def main(argv):
    p = ArgumentParser(description=__doc__)
    c = p.add_subparsers(dest="command", required=True).add_parser(
        "coord", help="the coordinate check: mean |activation| against width (or depth) over a few training steps")
    c.add_argument("--param", default="mup", help="|".join(PARAMS))
    c.add_argument("--widths", type=ints, default=(64, 128, 256, 512), help="widths d, comma-separated")
    c.add_argument("--depths", type=ints, help="depths L instead of widths, comma-separated")
    c.add_argument("--steps", type=int, default=10, help="training steps on one fixed batch")
    c.add_argument("--lr", type=float, default=1e-3, help="base learning rate")
    c.add_argument("--n_layer", type=int, default=2, help="depth of the width sweep")
    c.add_argument("--n_embd", type=int, default=128, help="width of the depth sweep")
    c.add_argument("--plot", default="", help="write the curves to this PNG")
    c.add_bool("--json", help="print the result as one JSON object")
    c.add_argument("--seed", type=int, default=0, help="initialisation and batch seed")
    f = p.parse_args(argv)
    if f.steps < 1:
        raise MupError(f"--steps must be at least 1, got {f.steps}")
    r = coord_check(f.param, widths=f.widths, depths=f.depths, steps=f.steps, lr=f.lr,
                    n_layer=f.n_layer, n_embd=f.n_embd, seed=f.seed)
    if f.plot:
        plot_coord(r, f.plot)
    if f.json:
        import json
        print(json.dumps({k: v for k, v in r.items() if k != "records"}))
    else:
        axis = "depths" if f.depths else "widths"
        print(f"coordinate check: {r['param']}, {axis} {r[axis]}, {r['steps']} steps at lr {r['lr']}")
        for k, s in r["slopes"].items():
            print(f"  {k:10s} max |log-log slope| over steps: {s:.3f}   "
                  f"(slope at last step {r['final_slopes'][k]:+.3f})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except MupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
