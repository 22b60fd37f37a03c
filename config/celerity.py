# A Celerity-like model family (Bergsma et al. 2025, "Scaling with Collapse", arXiv 2509.25087),
# from one dial, the depth:
#   python train.py config/celerity.py --n_layer=4      (any --n_layer; everything else follows from it)
# CompleteP, width 32·depth, 20 tokens per parameter, linear decay to zero with 10% warmup, batch from Power
# Lines' B_opt(D), and weight decay set so that every group's AdamW timescale is τ (train.py --tau).
from mup import batch_opt

n_layer = globals().get("n_layer", 4)             # the dial: --n_layer=… on the command line
n_embd = 32 * n_layer
n_head = max(1, n_embd // 32)
param = "completep"
d_base, L_base = 64, 2
tpp = 20.0
_N = 12 * n_layer * n_embd ** 2                      # ≈ non-embedding parameters (attention 4d² + SwiGLU 8d²)
_T = 256
batch_tokens = max(2, round(batch_opt(tpp * _N, in_tokens=True) / _T)) * _T   # B_opt in tokens, whole sequences
seq_len_schedule = str(_T)
lr = 1.2e-2                                          # BTLM's µP base LR (the CPU default's 3e-3 is tuned for it alone)
schedule = "d2z"
warmup = 0.1
# τ as Celerity trained (Bergsma et al. 2025, §5: 0.175 at 20 TPP, 0.087 at 80, ≈0.05 at 234), not Power Lines'
# τ_opt law, which gives 0.224 / 0.108 / 0.061 there (≈1.25× larger): the published family is what this preset
# copies. Other TPPs fall back to the law (--tau=opt).
tau = {20.0: "0.175", 80.0: "0.087", 234.0: "0.05"}.get(float(globals().get("tpp", tpp)), "opt")
out_dir = f"out/celerity_L{n_layer}"
