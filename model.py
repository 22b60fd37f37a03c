"""
The BTLM-3B-8K architecture (Dey et al. 2023, arXiv 2309.11568), nanoGPT style, in one file:
a GPT with pre-LN LayerNorm, fused QKV with biases, a SwiGLU MLP, tied input/output embeddings, no position
embedding and ALiBi attention biases, under a parameterisation (SP, µP or CompleteP) from mup.py whose
multipliers live in the forward pass: α_in on the embedding, α_out/m_N on the logits, 1/d_head (or 1/√d_head)
as the attention scale and CompleteP's 1/m_L on every residual branch.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

from mup import (BTLM_ALPHA_IN, BTLM_ALPHA_OUT, BTLM_D_BASE, BTLM_SIGMA, PARAMS, Parameterisation, init_weights,
                 param_groups)

ATTN_IMPLS = ("auto", "sdpa", "flex", "naive", "causal")


class ModelError(ValueError):
    """A model configuration that cannot be built (one sentence naming the value)."""


@dataclass
class GPTConfig:
    block_size: int = 256        # training context (HF's n_positions); ALiBi itself works at any length
    vocab_size: int = 257        # 256 bytes + <|endoftext|> (data.py's "bytes"); GPT-2 BPE is 50257
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_inner: int = 0             # SwiGLU hidden width; 0 means floor(8/3 · n_embd) as in BTLM (6826 at 2560)
    dropout: float = 0.0
    ln_eps: float = 1e-5
    param: str = "mup"           # "sp" | "mup" | "completep" (mup.py)
    d_base: int = BTLM_D_BASE    # µP base width: m_N = n_embd / d_base
    L_base: int = 2              # CompleteP base depth: m_L = n_layer / L_base
    sigma: float = BTLM_SIGMA    # base init std σ
    alpha_in: float = BTLM_ALPHA_IN
    alpha_out: float = BTLM_ALPHA_OUT
    attn_impl: str = "auto"      # "auto": flex_attention on CUDA, SDPA with a per-key bias elsewhere;
    #                              "naive" is the explicit (H, T, T) reference; "causal" drops ALiBi (benchmarks only)
    attn_scale_power: float = None  # None: from param (SP 1/√d_head, µP 1/d_head); HF BTLM configs that pair µP
    #                                 multipliers with mup_scale_qk_dot_by_d = false set 0.5 here (config_from_hf)

    def __post_init__(self):
        for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, k) <= 0:
                raise ModelError(f"{k} must be positive, got {getattr(self, k)}")
        if self.n_embd % self.n_head:
            raise ModelError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.param not in PARAMS:
            raise ModelError(f"unknown parameterisation {self.param!r}; choose one of {', '.join(PARAMS)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ModelError(f"unknown attn_impl {self.attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_impl == "flex" and (self.dropout > 0 or self.n_embd // self.n_head < 16):
            raise ModelError(f"attn_impl='flex' needs head_dim ≥ 16 and no dropout (got head_dim "
                             f"{self.n_embd // self.n_head}, dropout {self.dropout}); use 'auto' or 'sdpa'")
        if self.n_inner == 0:
            self.n_inner = int(8 * self.n_embd / 3)


PRESETS = {
    # BTLM-3B-8K (Dey et al. 2023, the released cerebras/btlm-3b-8k-base config): 2,646,255,744 parameters, tied
    "btlm-3b-8k": GPTConfig(block_size=8192, vocab_size=50257, n_layer=32, n_head=32, n_embd=2560, n_inner=6826),
    # the CPU default that `python train.py` trains (byte vocabulary, ≈0.8M non-embedding parameters)
    "tiny": GPTConfig(block_size=256, vocab_size=257, n_layer=4, n_head=4, n_embd=128),
}


def get_preset(name, **overrides):
    if name not in PRESETS:
        raise ModelError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    if "n_embd" in overrides and "n_inner" not in overrides:
        overrides["n_inner"] = 0  # re-derive floor(8/3·d) for the new width rather than keep the preset's
    return replace(PRESETS[name], **overrides)


def alibi_slopes(n_head):
    """ALiBi head slopes m_h (Press et al. 2022, §3): 2^(−8h/H) for h = 1..H when H is a power of two;
    otherwise the 2^⌊log2 H⌋ power-of-two slopes followed by every other slope of the 2·2^⌊log2 H⌋ set."""
    if n_head <= 0:
        raise ModelError(f"n_head must be positive, got {n_head}")

    def geometric(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    p = 2 ** int(math.floor(math.log2(n_head)))
    slopes = geometric(p) + geometric(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes, dtype=torch.float32)


_flex_cache = {}


def _flex_entry(T, dev):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if (T, str(dev)) not in _flex_cache:
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=dev)
        fn = torch.compile(flex_attention) if dev.type == "cuda" else flex_attention
        _flex_cache[(T, str(dev))] = (mask, fn)
    return _flex_cache[(T, str(dev))]


def build_flex_masks(lengths, device):
    """Build the causal BlockMask of each sequence length now, outside any torch.compile'd graph: built lazily inside
    one, a new length (VSL's switch) is traced into the graph and recompiles it."""
    dev = torch.empty(0, device=device).device  # "cuda" → "cuda:0", the key flex_alibi_attention looks up
    for T in lengths:
        _flex_entry(T, dev)


def flex_alibi_attention(q, k, v, slopes, scale):
    """Causal ALiBi attention with flex_attention: the bias is a score_mod, so no (T, T) tensor exists at all.
    Compiled on CUDA (where it trains); eager elsewhere (CPU runs its forward only, which the tests use)."""
    mask, fn = _flex_entry(q.size(-2), q.device)

    def alibi(score, b, h, qi, ki):
        return score - slopes[h] * (qi - ki)
    return fn(q, k, v, score_mod=alibi, block_mask=mask, scale=scale)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, scale):
        super().__init__()
        self.n_head, self.n_embd, self.scale = config.n_head, config.n_embd, scale
        self.impl, self.dropout = config.attn_impl, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)   # fused q, k, v with bias
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)  # fixed, fp32, not trained

    def forward(self, x, cache=None):
        """cache: this layer's [k, v] list (None entries when empty), extended in place for KV-cached decoding."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            if cache[0] is not None:
                past = cache[0].size(2)
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        S = k.size(2)  # keys: past + T, at absolute positions 0..S-1; queries at past..S-1
        drop = self.dropout if self.training else 0.0
        impl = self.impl
        if impl == "auto":  # flex needs head_dim ≥ 16 and has no attention dropout; SDPA serves every other case
            flex_ok = x.is_cuda and past == 0 and drop == 0.0 and C // self.n_head >= 16
            impl = "flex" if flex_ok and not torch.jit.is_tracing() else "sdpa"
        if impl == "flex":
            y = flex_alibi_attention(q, k, v, self.slopes, self.scale)
        elif impl == "naive":
            y = self.naive(q, k, v, past, drop)
        else:
            # score − m_h·(i − j) = score + m_h·j − m_h·i, and −m_h·i is constant along a softmax row, so a per-key
            # bias m_h·j of shape (1, H, 1, S) with causal masking gives exactly ALiBi (Press et al. 2022, §3) at the
            # memory cost of plain causal attention.
            bias = None
            if impl != "causal":
                pos = torch.arange(S, device=x.device, dtype=self.slopes.dtype)
                bias = (self.slopes[:, None, None] * pos).unsqueeze(0)
            causal = past == 0 and drop == 0.0  # SDPA's own causal masking; it refuses is_causal with a mask + dropout
            mask = bias
            if not causal and T > 1:  # query i (absolute past + i) sees keys j ≤ past + i, as an explicit (T, S) mask
                allowed = torch.arange(S, device=x.device)[None, :] <= past + torch.arange(T, device=x.device)[:, None]
                mask = torch.zeros(T, S, device=x.device).masked_fill(~allowed, float("-inf"))
                mask = mask if bias is None else mask + bias
            # m_h·j must stay fp32: in bf16 it is off by whole units at key positions in the thousands. Autocast would
            # round it, so SDPA runs outside autocast on the bf16 q, k, v autocast made; the CPU kernel adds an fp32
            # mask to bf16 scores exactly. CUDA kernels may take the mask at q's precision: there q, k, v go fp32.
            dtype = q.dtype
            if mask is not None and x.device.type != "cpu" and dtype != mask.dtype:
                q, k, v = q.to(mask.dtype), k.to(mask.dtype), v.to(mask.dtype)
            with torch.autocast(x.device.type, enabled=False):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=drop,
                                                   scale=self.scale).to(dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _apply(self, fn, *args, **kwargs):
        # model.to(bfloat16) must not round the fixed slopes: m_h·j needs fp32 at long context (see forward). They
        # follow a float64 model, since torch 2.13's CPU SDPA mis-reads an fp32 attn_mask next to float64 queries.
        super()._apply(fn, *args, **kwargs)
        dtype = torch.promote_types(self.slopes.dtype, torch.float32)
        self.slopes = alibi_slopes(self.n_head).to(device=self.slopes.device, dtype=dtype)
        return self

    def naive(self, q, k, v, past=0, drop=0.0):
        """The textbook reference: softmax(q·kᵀ·scale − m·|i − j| + causal mask)·v with a full (H, T, S) bias."""
        T, S = q.size(-2), k.size(-2)
        i = torch.arange(past, past + T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        att = (q @ k.transpose(-2, -1)).float() * self.scale - self.slopes[:, None, None] * (i - j).abs()
        att = F.dropout(att.masked_fill(j > i, float("-inf")).softmax(dim=-1), drop)
        return att.to(v.dtype) @ v


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020) as BTLM writes it: c_proj(c_fc(x) · silu(c_fc2(x))), value first, gate second."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_fc2 = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.c_fc(x) * F.silu(self.c_fc2(x))))


class Block(nn.Module):

    def __init__(self, config, pz):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps)
        power = pz.attn_scale_power if config.attn_scale_power is None else config.attn_scale_power
        self.attn = CausalSelfAttention(config, scale=(config.n_embd // config.n_head) ** -power)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps)
        self.mlp = MLP(config)
        self.residual_mult = pz.residual_mult  # 1, or CompleteP's 1/m_L

    def forward(self, x, cache=None):
        x = x + self.residual_mult * self.attn(self.ln_1(x), cache)
        return x + self.residual_mult * self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.pz = Parameterisation.from_config(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, self.pz) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.ln_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (BTLM, GPT-2)
        if not any(p.is_meta for p in self.parameters()):
            init_weights(self)

    def num_params(self, non_embedding=True):
        """Parameters, counted once each; non_embedding drops the (tied) token embedding: N of the scaling laws."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache=None):
        """Logits for every position and the mean cross-entropy when targets are given (-1 is ignored);
        otherwise logits of the last position only (nanoGPT's convention for sampling)."""
        x = self.features(idx, cache)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def features(self, idx, cache=None):
        """The last layer's normalised hidden states times the µP readout α_out/m_N (mup.py): logits = features·Wᵀ
        for the tied embedding W. Scaling x before the matmul equals scaling the logits, and is applied once."""
        x = self.transformer.drop(self.transformer.wte(idx) * self.pz.embedding_mult)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i])
        return self.transformer.ln_f(x) * self.pz.logit_mult

    def flops_per_token(self, T):
        """Training FLOPs per token at context T: 6 per weight (2 forward + 4 backward) over the non-embedding
        weights and the readout V·d, plus attention's q·kᵀ and a·v, 2·2·T·d forward per layer for full attention,
        counted once for the causal half: 6·(N + V·d) + 6·L·T·d (cf. Chinchilla App. F, PaLM App. B)."""
        c = self.config
        return 6 * (self.num_params() + c.vocab_size * c.n_embd) + 6 * c.n_layer * T * c.n_embd

    def estimate_mfu(self, tokens_per_s, T, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (bench.py measures the peak)."""
        return self.flops_per_token(T) * tokens_per_s / peak_flops

    def configure_optimizers(self, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8, fused=None, width_scaled_wd=False):
        """AdamW over mup.py's param groups, each with its own lr (and `lr_mult` for the schedule), λ and ε;
        width_scaled_wd gives µP's hidden matrices λ·m_N, so every group has the same AdamW timescale."""
        groups = param_groups(self, lr, weight_decay, eps, width_scaled_wd)
        if fused is None:
            fused = all(p.device.type in ("cuda", "cpu") for p in self.parameters())
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    def new_cache(self):
        return [[None, None] for _ in range(self.config.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 is greedy. With the KV cache each step
        feeds one token; ALiBi has no position table, so generation may run past block_size."""
        cache = self.new_cache() if use_cache else None
        # the tied readout as a contiguous (d, V) copy: in decoding's one-row products CPU BLAS reads it 2.4x faster
        # than the (V, d) embedding it shares storage with (2.9 vs 7.0 ms for 50,304 × 384; README, Performance)
        w_out = self.lm_head.weight.t().contiguous()
        inp = idx
        for _ in range(max_new_tokens):
            logits = (self.features(inp, cache)[:, -1, :] @ w_out).float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            inp = nxt if use_cache else idx
        return idx
