"""
Parameterisations of the GPT in model.py: standard (SP), µP and CompleteP.

A parameterisation says, for every weight of a model of width d and depth L, how it is initialised, what
multiplier it meets in the forward pass, and which AdamW learning rate, weight decay and epsilon it gets, all
as a function of base hyper-parameters tuned once on a small proxy (width d_base, depth L_base). Under µP the
best hyper-parameters of the proxy stay the best as width grows (µTransfer); CompleteP extends that to depth.
The one table this file implements (docs/science.md §2) comes from Yang et al. 2022 "Tensor Programs V", the
Cerebras µP guide and BTLM-3B-8K (Dey et al. 2023 §3.2), and CompleteP (Dey et al. 2025 "Don't be lazy", α = 1).

It also holds the optimizer-side recipe that goes with the table: each group's AdamW timescale τ, Power Lines' laws
and the LR schedule. coord.py checks the table: `python coord.py --param=mup`.
"""
import math
from dataclasses import dataclass

import numpy as np


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
