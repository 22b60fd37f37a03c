# BTLM-3B-8K's pre-training recipe (Dey et al. 2023, §3 and Table 2), for a GPU cluster:
#   python train.py config/btlm_3b_8k.py --strategy=fsdp --memory_plan=8x80    # per-GPU memory, before launching
#   torchrun --nnodes=... --nproc_per_node=8 train.py config/btlm_3b_8k.py --strategy=fsdp --activation_checkpointing
# FSDP2 shards the fp32 weights, gradients and AdamW state (16 B/param, 42 GB for 2.65B parameters) over the GPUs;
# the memory plan puts FSDP on 8 GPUs at 19.2 GB per GPU with activation checkpointing (65.1 GB without) for
# the micro-batch below, so 40 GB cards need --activation_checkpointing and 80 GB cards fit either way. DDP keeps
# all 42 GB on every GPU and does not fit without activation checkpointing. With several nodes, out_dir must be
# on a filesystem every node sees: each rank writes its own shards of a checkpoint.
# Data: SlimPajama tokenised with GPT-2's BPE, e.g.
#   python data.py --source=hf:cerebras/SlimPajama-627B --out=data/slimpajama --tokenizer=gpt2 --workers=32
model = "btlm-3b-8k"              # 32 layers, d 2560, 32 heads, SwiGLU 6826, ALiBi, tied embeddings, µP (d_base 256)
data = "slimpajama"
tokens = 627_000_000_000          # 627B tokens
batch_tokens = 1920 * 2048        # 3.93M tokens a step: 1,920 × 2,048, then 480 × 8,192
seq_len_schedule = "2048:0.75,8192:0.25"   # VSL: 75% of tokens at 2k, the last 25% at 8k, one LR schedule
micro_batch_tokens = 8 * 2048     # per GPU per forward; lower it if memory is short (--memory_plan shows the need)
lr = 1.2e-2                       # µP base LR: hidden matrices get 1.2e-3 at m_N = 10
weight_decay = 0.1
beta1, beta2, eps = 0.9, 0.95, 1e-8
grad_clip = 1.0
schedule = "linear"
warmup = 375e6 / 627e9            # ≈375M tokens of linear warmup
final_lr_frac = 0.0085            # linear decay to 0.85% of the peak
dtype = "bfloat16"                # FSDP: bf16 parameters in flight and compute, fp32 master weights and reductions
compile = True
eval_interval = 1000
eval_batches = 20
log_interval = 10
keep_last = 3
sample_tokens = 0
