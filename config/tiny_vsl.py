# BTLM's variable-sequence-length recipe in miniature, on this CPU: 75% of tokens at 128, 25% at 512
# (BTLM: 2,048 then 8,192), the same tokens per step in both stages and one LR schedule.
#   python train.py config/tiny_vsl.py
out_dir = "out/tiny_vsl"
seq_len_schedule = "128:0.75,512:0.25"
batch_tokens = 8192               # 64 × 128, then 16 × 512
tokens = 4_000_000
schedule = "linear"
