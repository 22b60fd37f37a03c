"""
Train a BTLM-style GPT: pre-training under µP / CompleteP with variable sequence length (VSL), or continual
pre-training (CPT) of a trained run on a new domain with replay. One file, nanoGPT style.

    python train.py                                           # tiny µP model on the built-in English prose
    python train.py config/tiny_vsl.py --max_iters=200        # a config file, then --key=value overrides
    python train.py --init_from=out/tiny --out_dir=out/cpt --data=stdlib:0.75,prose:0.25   # CPT, 25% replay
    python train.py --init_from=resume --out_dir=out/tiny     # pick up exactly where a run stopped
    torchrun --standalone --nproc_per_node=2 train.py         # data-parallel (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 train.py config/btlm_3b_8k.py --strategy=fsdp --activation_checkpointing
    python train.py config/btlm_3b_8k.py --strategy=fsdp --memory_plan=8x80   # per-GPU memory before launch

A run lives in out_dir: config.json (every setting, N, D, TPP, B, steps, η, λ, τ per group),
log.jsonl (one JSON object a line) and the last `keep_last` checkpoints: ckpt_XXXXXXX.pt (one process, DDP) or a
ckpt_XXXXXXX/ folder of Distributed Checkpoint shards (FSDP), each written under a temporary name and renamed.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data as data_mod
import hf
import model as model_mod
import mup
from collapse import CollapseError, CollapseMonitor
from configurator import ConfigError, atomic, configure
from model import GPT, GPTConfig, ModelError, get_preset


@dataclass
class Config:
    # I/O
    out_dir: str = "out/tiny"         # the run directory
    init_from: str = "scratch"        # scratch | resume | <run dir> (CPT from its last checkpoint) | hf:<repo or dir>
    data: str = "prose"               # mixture of datasets under data_dir: "prose" or "stdlib:0.75,prose:0.25"
    data_dir: str = "data"            # where `python data.py` put the datasets (built-ins are prepared on demand)
    # model (preset, then overrides; 0 / "" keeps the preset's value)
    model: str = "tiny"               # a key of model.PRESETS
    n_layer: int = 0
    n_head: int = 0
    n_embd: int = 0
    param: str = ""                   # sp | mup | completep
    d_base: int = 0                   # µP base width (m_N = n_embd / d_base)
    L_base: int = 0                   # CompleteP base depth (m_L = n_layer / L_base)
    dropout: float = -1.0             # -1 keeps the preset's (0)
    # budget: exactly one of max_iters, tokens, tpp (tokens per non-embedding parameter) may be non-zero
    max_iters: int = 0
    tokens: int = 2_000_000
    tpp: float = 0.0
    batch_tokens: int = 2048          # tokens per optimizer step (all ranks, all micro-batches)
    micro_batch_tokens: int = 0       # tokens per forward/backward on one rank; 0 = batch_tokens / world_size
    seq_len_schedule: str = "256"     # VSL: "2048:0.75,8192:0.25" = 75% of tokens at 2,048, then 25% at 8,192
    # optimizer (base values η, λ of the µP proxy; mup.py scales them per parameter group)
    lr: float = 3e-3                  # µP base LR η, tuned for the default model on prose (BTLM-3B-8K: 1.2e-2)
    weight_decay: float = 0.1
    tau: str = ""                     # "" keeps weight_decay; a number or "opt" (Power Lines' τ_opt(TPP)) sets each
    #                                   group's λ so that its AdamW timescale B/(η_g·λ_g·D) is τ (mup.py)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0            # 0 disables
    schedule: str = "linear"          # linear (to final_lr_frac) | d2z | cosine (to 10%) | constant | wsd
    warmup: float = 0.02              # fraction of steps with linear warmup
    final_lr_frac: float = 0.0085     # BTLM decays linearly to 0.85% of the peak
    wsd_decay: float = 0.2            # wsd: the last fraction of steps decays linearly to zero
    # evaluation, logging, checkpoints
    eval_interval: int = 100          # steps between evaluations and checkpoints
    eval_batches: int = 4
    log_interval: int = 10            # steps between log lines
    keep_last: int = 2                # checkpoints kept
    stop_at: int = 0                  # stop (with a checkpoint) after this step, e.g. before a job's time limit
    collapse_ref: str = ""            # healthy runs (dirs or CSV): warn when this run's val loss leaves their curve
    sample_tokens: int = 200          # sample printed at the end (0: none)
    # system
    seed: int = 1337
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    dtype: str = "auto"               # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = False
    strategy: str = "auto"            # auto (ddp under torchrun, else one process) | ddp | fsdp (sharded, torchrun)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (long sequences)
    memory_plan: str = ""             # "8x80": print per-GPU memory for 8 GPUs of 80 GB under this run, then exit
    peak_flops: float = 0.0           # for MFU; 0 picks a per-device value (see peak_flops_for)


class TrainError(Exception):
    """A setting or file the run cannot work with (one sentence)."""


# tokens per validation batch, fixed: runs of any batch size (a family under B_opt(D), say) and any seed are scored
# on the same windows whenever they share the first sequence length
VAL_TOKENS = 1024  # the batch every experiment in experiments/ used, so their runs reproduce

# keys a resumed run may change: how it runs, not what it computes
RESUME_KEYS = {"init_from", "out_dir", "stop_at", "device", "compile", "log_interval", "sample_tokens", "collapse_ref",
               "activation_checkpointing", "memory_plan", "strategy"}
STRATEGIES = ("auto", "ddp", "fsdp")


def peak_flops_for(device, dtype):
    """Peak matmul FLOP/s that MFU is measured against (pass --peak_flops for another machine; `python bench.py
    --only=peak` measures it): 142 GFLOP/s fp32 on this project's 2-core CPU host (bench.py, 2026-11-27); for bf16,
    410 GFLOP/s as measured on a 2-core AVX-512-BF16 host (hosts without it run bf16 ~100x slower than fp32);
    on CUDA an H100's dense peak, 989 TFLOP/s bf16 and 67 TFLOP/s fp32."""
    if device.startswith("cuda"):
        return 989e12 if dtype == "bfloat16" else 67e12
    return 4.1e11 if dtype == "bfloat16" else 1.42e11


# ---------------------------------------------------------------------------------------------------------------
# run directories: checkpoints, config.json, the code version

CKPT = re.compile(r"ckpt_\d{7}(\.pt)?$")  # a file (one process, DDP) or a DCP folder (FSDP); never a .tmp


def checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if CKPT.match(f))


def _drop_old(out_dir, keep_last):
    for old in checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def save_checkpoint(out_dir, state, keep_last):
    path = os.path.join(out_dir, f"ckpt_{state['step']:07d}.pt")
    with atomic(path) as tmp:                # a checkpoint that exists is complete
        torch.save(state, tmp)
    _drop_old(out_dir, keep_last)


def save_sharded(out_dir, model, optimizer, meta, keep_last):
    """A Distributed Checkpoint (torch.distributed.checkpoint) of an FSDP run: every rank writes its own shards of
    the model and of the AdamW state into ckpt_XXXXXXX.tmp/, rank 0 adds meta.pt (step, settings, RNG states) and
    renames the folder once all ranks are done, so a crash mid-save leaves only a .tmp folder, which is never read.
    DCP records each tensor's global shape, so the checkpoint loads at any world size (resharding)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    final = os.path.join(out_dir, f"ckpt_{meta['step']:07d}")
    master = dist.get_rank() == 0
    if master:
        shutil.rmtree(final + ".tmp", ignore_errors=True)  # a save that crashed before
        os.makedirs(final + ".tmp")
    dist.barrier()
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=final + ".tmp")                  # returns on every rank once .metadata is written
    if master:
        torch.save(meta, os.path.join(final + ".tmp", "meta.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(final + ".tmp", final)
        _drop_old(out_dir, keep_last)
    dist.barrier()


def load_checkpoint(run_dir):
    """The last checkpoint of a run: a .pt file memory-mapped (its tensors are read only as they are copied into the
    model and optimizer, and freed when the caller drops them), or a DCP folder's meta.pt with "dcp" set to the
    folder, whose shards load_sharded and model_from read."""
    ck = checkpoints(run_dir)
    if not ck:
        raise TrainError(f"{run_dir} holds no checkpoint (ckpt_*) to start from")
    try:
        if os.path.isdir(ck[-1]):
            return dict(torch.load(os.path.join(ck[-1], "meta.pt"), map_location="cpu", weights_only=False), dcp=ck[-1])
        return torch.load(ck[-1], map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise TrainError(f"checkpoint {ck[-1]} cannot be read ({type(e).__name__}); "
                         "delete it to fall back to an older one")


def load_sharded(model, optimizer, path):
    """Load a DCP checkpoint into a model (FSDP-sharded or whole) and, when given, its optimizer: each rank reads the
    pieces of the saved shards that overlap its own, whatever the world size that wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # without a process group DCP reads in this process alone, as meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)  # in place
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def model_from(ck):
    """The whole model a checkpoint holds (a .pt file's or a DCP folder's, gathered): its config, then its weights.
    Built on the meta device and filled once, so the weights are held once."""
    model = build_model(GPTConfig(**ck["model_config"]), "cpu", fsdp=False, activation_checkpointing=False)
    if "dcp" in ck:
        load_sharded(model, None, ck["dcp"])
    else:
        model.load_state_dict(ck["model"])
    return model


def write_json(path, obj):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def code_version():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    h = hashlib.sha256()
    for f in ("model.py", "mup.py", "data.py", "train.py"):
        with open(os.path.join(here, f), "rb") as fh:
            h.update(fh.read())
    return {"git": rev, "sha256": h.hexdigest()[:16]}


def scratch_config(cfg):
    """The preset, with the settings that override it (0 / "" / -1 keep the preset's)."""
    over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "param", "d_base", "L_base") if getattr(cfg, k)}
    if cfg.dropout >= 0:
        over["dropout"] = cfg.dropout
    return get_preset(cfg.model, **over)


def init_model(cfg, ck):
    """(config, weights, cpt): the model to train, as its GPTConfig and where its weights come from: None (from
    scratch: initialised by the parameterisation), a full state dict (another run's .pt checkpoint, a Hugging Face
    model), or a DCP folder path; ck is the checkpoint being resumed (its weights are loaded with the optimizer).
    cpt describes the base model of a CPT run (None when pre-training)."""
    if ck is not None:
        return GPTConfig(**ck["model_config"]), None, ck["cpt"]
    if cfg.init_from == "scratch":
        return scratch_config(cfg), None, None
    if cfg.init_from.startswith("hf:"):
        model = hf.from_pretrained(cfg.init_from[3:])
        return model.config, model.state_dict(), {"init_from": cfg.init_from, "base_N": model.num_params(),
                                                  "base_D": None, "base_ptpp": None, "base_data": None}
    if os.path.abspath(cfg.init_from) == os.path.abspath(cfg.out_dir):
        raise TrainError("--init_from and --out_dir are the same run; CPT writes a new run directory")
    if not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise TrainError(f"--init_from={cfg.init_from} is neither scratch, resume, hf:<name> nor a run directory")
    base_ck = load_checkpoint(cfg.init_from)
    config = GPTConfig(**base_ck["model_config"])
    with torch.device("meta"):
        base_N = GPT(config).num_params()
    base = json.load(open(os.path.join(cfg.init_from, "config.json")))
    # all tokens behind the model: this run's, plus its own base model's when it was itself a CPT run
    base_tokens = base_ck["tokens"] + ((base.get("cpt") or {}).get("base_D") or 0)
    return config, base_ck.get("dcp") or base_ck["model"], {
        "init_from": cfg.init_from, "base_N": base_N, "base_D": base_tokens, "base_ptpp": base_tokens / base_N,
        "base_data": base["data"]}


# ---------------------------------------------------------------------------------------------------------------
# building the model for a strategy: meta device → activation checkpointing → FSDP2 → memory → weights

def build_model(config, device, fsdp, activation_checkpointing, mp_policy=None, compile_blocks=False):
    """The model on `device`, built on the meta device so that no rank ever holds more than its share: under FSDP2
    (torch.distributed.fsdp.fully_shard) each block is sharded, then the root (embedding, final LayerNorm; the tied
    lm_head is the same Parameter and stays tied), and to_empty allocates only this rank's shards. Weights are set
    afterwards by init_params or a loader. Activation checkpointing wraps each block with PyTorch's
    checkpoint_wrapper (non-reentrant torch.utils.checkpoint), under FSDP as torchtitan does, so a block's
    activations are recomputed in backward and only its input is kept."""
    with torch.device("meta"):
        model = GPT(config)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.transformer.h):
            model.transformer.h[i] = checkpoint_wrapper(block)
    if compile_blocks:
        # FSDP2 + torch.compile as torchtitan does it: each block compiled, FSDP's all-gather / reduce-scatter hooks
        # around the compiled regions, so communication of block i+1 overlaps the computation of block i
        for block in model.transformer.h:
            block.compile()
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = mp_policy or MixedPrecisionPolicy()
        for block in model.transformer.h:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model.to_empty(device=device)  # ALiBi slopes are recomputed by CausalSelfAttention._apply, not left empty
    if model.lm_head.weight is not model.transformer.wte.weight:
        # to_empty gives an unsharded module a new Parameter per module, which unties them (FSDP2 keeps the tie)
        model.lm_head.weight = model.transformer.wte.weight
    return model


@torch.no_grad()
def init_params(model):
    """Initialise a (possibly sharded) model from the global RNG: one whole parameter at a time on the CPU, in
    named_parameters order, by mup.init_param, then this rank's shard of it is kept (distribute_tensor cuts the
    same dim-0 chunks FSDP2 holds). The largest tensor ever whole is one parameter (the embedding, 0.5 GB at 3B),
    and every strategy and world size starts from the same bits for the same seed."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype)
        mup.init_param(model.pz, name, full)
        if isinstance(p, DTensor):
            # src_data_rank=None: every rank drew the same tensor, so each cuts its own chunk with no scatter
            p.copy_(distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(full)


def load_full(model, sd):
    """Weights from a full state dict (CPU, possibly memory-mapped) into a model, sharded or not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, {k: v for k, v in sd.items()}, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer(model, optimizer, osd):
    """A .pt checkpoint's optimizer state (optimizer.state_dict(): parameters numbered in param-group order) into the
    optimizer of a sharded model: the numbers become parameter names, in the same order, since mup.param_groups
    builds the groups alike for every strategy; set_optimizer_state_dict then keeps each rank's shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): n.replace("_checkpoint_wrapped_module.", "") for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    fqn = dict(zip((i for g in osd["param_groups"] for i in g["params"]), order))
    full = {"state": {fqn[i]: s for i, s in osd["state"].items()},
            "param_groups": [dict(g, params=[fqn[i] for i in g["params"]]) for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def rng_states(device, world):
    """Every rank's RNG states, CPU and (on CUDA) its device's, gathered so that rank 0 can save them all."""
    mine = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [mine]
    out = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return out


def restore_rng(states, device, rank, world, seed, step):
    """Each rank takes back its own RNG states; at another world size there is no such state, so each rank is
    reseeded from (seed, rank, step) (only dropout draws from it). Checkpoints older than per-rank states hold one
    CPU state."""
    if isinstance(states, torch.Tensor):
        states = [{"cpu": states}]
    if len(states) == world:
        torch.set_rng_state(states[rank]["cpu"])
        if device.startswith("cuda") and "cuda" in states[rank]:
            torch.cuda.set_rng_state(states[rank]["cuda"], device)
    else:
        torch.manual_seed(hash((seed, rank, step)) % 2**63)


def clip_grads(params, max_norm):
    """The global gradient norm, and the gradients scaled to max_norm when above it (max_norm 0: not clipped).
    Under FSDP the norm of the sharded gradients is a DTensor; full_tensor() all-reduces it, as torchtitan does."""
    from torch.distributed.tensor import DTensor
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ---------------------------------------------------------------------------------------------------------------
# the memory plan: per-GPU bytes of a run before launching it (--memory_plan=GxMEM)

def memory_plan(config, strategy, G, micro_tokens, dtype, activation_checkpointing):
    """Bytes per GPU of a training step, by term: an upper bound of the peak. P parameters (the tied embedding once),
    L blocks of P_b each, the root (embedding, final LN) P_r = P − L·P_b, width d, SwiGLU width f, vocabulary V,
    n tokens per micro-batch per GPU, s bytes per activation element (2 in bf16, 4 in fp32).
      fp32 weights 4P, gradients 4P, AdamW moments 8P: divided by G under FSDP (ZeRO-3), whole on every GPU under DDP
        (whose gradients are views into its all-reduce buckets, so they are held once)
      in flight: FSDP all-gathers the root (kept from forward to backward) and two blocks (one computing, one
        prefetched) in the compute dtype, and holds one block's or the root's unsharded fp32 gradient before its
        reduce-scatter: s·P_r + 2·s·P_b + 4·max(P_b, P_r); DDP under bf16 autocast keeps bf16 copies of the weights
        for backward: 2P
      activations saved for backward, per token and block s·(8d + 4f): the LayerNorms' inputs and outputs (4d), q, k
        and v (3d), the attention output (d), the SwiGLU's two projections, silu(gate) and their product (4f); flash
        and flex attention keep no T×T scores. Per token at the head s·4d + V·(s + 8) in bf16 (logits, their fp32
        copy, log-softmax), V·8 in fp32. With activation checkpointing each block keeps its input (s·d) and one
        block is recomputed at a time. Under DDP's bf16 autocast the residual stream and LayerNorms stay fp32, so
        activations are up to 2x this count there; under FSDP's MixedPrecisionPolicy they are bf16 as counted.
    Measured against the peak RSS of small fp32 models on CPU (test_memory_plan_bounds_the_measured_peak)."""
    with torch.device("meta"):
        model = GPT(config)
    P, P_b = model.num_params(non_embedding=False), sum(p.numel() for p in model.transformer.h[0].parameters())
    d, f, V, L = config.n_embd, config.n_inner, config.vocab_size, config.n_layer
    P_r = P - L * P_b
    s = 2 if dtype == "bfloat16" else 4
    shard = G if strategy == "fsdp" else 1
    out = {"weights": 4 * P / shard, "gradients": 4 * P / shard, "adamw": 8 * P / shard}
    if strategy == "fsdp":
        out["in_flight"] = s * P_r + 2 * s * P_b + 4 * max(P_b, P_r)
    else:
        out["in_flight"] = 2 * P if dtype == "bfloat16" else 0
    n = micro_tokens
    block = s * (8 * d + 4 * f)
    head = s * 4 * d + V * (s + 8 if s == 2 else 8)
    out["activations"] = n * ((L * s * d + block if activation_checkpointing else L * block) + head)
    out["total"] = sum(out.values())
    return out


def memory_plan_text(cfg):
    """The --memory_plan=GxMEM report: per-GPU memory of this run on G GPUs of MEM GB, with and without activation
    checkpointing, and whether it fits (within 90% of the card: the rest is the CUDA context, NCCL's buffers and
    the allocator's fragmentation)."""
    m = re.fullmatch(r"(\d+)x(\d+(?:\.\d+)?)", cfg.memory_plan)
    if not m or int(m.group(1)) < 1:
        raise TrainError(f"--memory_plan={cfg.memory_plan} is not GPUSxGB, e.g. 8x80 for eight 80 GB GPUs")
    G, card = int(m.group(1)), float(m.group(2)) * 1e9
    if cfg.init_from == "resume" or os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        run = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
        config = GPTConfig(**json.load(open(os.path.join(run, "config.json")))["model_config"])
    else:
        config = scratch_config(cfg)
    strategy = cfg.strategy if cfg.strategy != "auto" else ("ddp" if G > 1 else "single")
    dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype  # auto: the CUDA default
    micro = cfg.micro_batch_tokens or cfg.batch_tokens // G
    with torch.device("meta"):
        P = GPT(config).num_params(non_embedding=False)
    lines = [f"memory plan: {cfg.model} ({P:,} parameters), {strategy} "
             f"on {G} GPU(s) of {card / 1e9:g} GB, {dtype}, {micro:,} tokens per micro-batch per GPU"]
    for ac in (False, True):
        p = memory_plan(config, strategy, G, micro, dtype, ac)
        fits = p["total"] <= 0.9 * card
        lines.append(f"  {'with' if ac else 'without'} activation checkpointing: " + ", ".join(
            f"{k.replace('_', ' ')} {v / 1e9:.2f} GB" for k, v in p.items() if k != "total")
            + f"; total {p['total'] / 1e9:.2f} GB per GPU: {'fits' if fits else 'does not fit'}"
            + ("" if fits else f" (over 90% of {card / 1e9:g} GB)"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------

def main(argv):
    # -------- settings: defaults, config files, --key=value; a resumed run takes its checkpoint's
    cfg, given = configure(Config, argv)
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise TrainError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.strategy not in STRATEGIES:
        raise TrainError(f"unknown strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if cfg.schedule not in mup.SCHEDULES:
        raise TrainError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(mup.SCHEDULES)}")
    ck = None
    if cfg.init_from == "resume":
        ck = load_checkpoint(cfg.out_dir)
        saved = ck["config"]
        changed = {k for k in given if k not in RESUME_KEYS and given[k] != saved.get(k, Config.__dict__.get(k))}
        if changed:
            raise TrainError(f"a resumed run keeps its settings; {', '.join(sorted(changed))} differ from "
                             f"{cfg.out_dir}/config.json (only {', '.join(sorted(RESUME_KEYS))} may change)")
        for k, v in saved.items():
            if k not in given or k not in RESUME_KEYS:
                setattr(cfg, k, v)
        cfg.init_from = "resume"
    elif checkpoints(cfg.out_dir) and not cfg.memory_plan:
        raise TrainError(f"{cfg.out_dir} already holds a run; use --init_from=resume or another --out_dir")
    if cfg.memory_plan:  # a dry run: nothing is built, no process group is needed
        print(memory_plan_text(cfg))
        return

    # -------- device and distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    fsdp = cfg.strategy == "fsdp"
    if fsdp and "WORLD_SIZE" not in os.environ:
        raise TrainError("--strategy=fsdp shards the model over processes started by torchrun "
                         "(torchrun --nproc_per_node=G train.py ...), and this process was not")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    master = rank == 0
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        # fp32 matmuls (and the fp32 parts of a bf16 run) on tensor cores as TF32; CUDA's default is full fp32
        torch.set_float32_matmul_precision("high")
    if cfg.dtype == "auto":  # BTLM trained in bf16: the CUDA default; CPUs without AVX-512-BF16 run it ~100x slower
        cfg.dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if world > 1 or fsdp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    # FSDP2 on CUDA: bf16 parameters in flight and for compute, fp32 master weights, gradient reductions in fp32
    # (torch.distributed.fsdp.MixedPrecisionPolicy); elsewhere autocast casts inside each op as before
    mp_policy = None
    if fsdp and cfg.dtype == "bfloat16" and device.startswith("cuda"):
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bfloat16" and mp_policy is None)

    # -------- model: built on the meta device, sharded (FSDP), then filled: the same weights on every rank
    config, weights_from, cpt = init_model(cfg, ck)
    model = build_model(config, device, fsdp, cfg.activation_checkpointing, mp_policy,
                        compile_blocks=cfg.compile and fsdp)
    torch.manual_seed(cfg.seed)
    if isinstance(weights_from, str):
        load_sharded(model, None, weights_from)   # CPT from an FSDP run's DCP folder
    elif weights_from is not None:
        load_full(model, weights_from)            # CPT from a .pt run or a Hugging Face model
    elif ck is None:
        init_params(model)
    del weights_from
    N = model.num_params()

    # -------- data: a mixture of domains; a CPT run also evaluates its base model's domain (forgetting)
    weights = data_mod.parse_mixture(cfg.data)
    if master and any(d in data_mod.BUILTIN for d in weights):
        data_mod.ensure_builtin(cfg.data_dir)
    if world > 1:
        torch.distributed.barrier()
    seq_lens = data_mod.parse_seq_len_schedule(cfg.seq_len_schedule)
    if cpt is not None and ck is None:
        base_data = cpt.pop("base_data")
        base_domains = list(data_mod.parse_mixture(base_data)) if base_data else []
        targets = [d for d in weights if d not in base_domains]
        cpt.update(base_domain=base_domains[0] if base_domains else None, target_domain=targets[0] if targets else None,
                   replay=sum(w for d, w in weights.items() if d in base_domains))
    eval_names = list(dict.fromkeys(list(weights) + ([cpt["base_domain"]] if cpt and cpt.get("base_domain") else [])))
    domains = {d: data_mod.Dataset(d if os.path.isdir(d) else os.path.join(cfg.data_dir, d)) for d in eval_names}
    for ds in domains.values():
        if ds.vocab_size > model.config.vocab_size:
            raise TrainError(f"dataset {ds.path} has vocabulary {ds.vocab_size} but the model has "
                             f"{model.config.vocab_size}: the checkpoint and the data do not match")

    # -------- budget: D tokens in `steps` optimizer steps of B = batch_tokens tokens
    budgets = [k for k in ("max_iters", "tokens", "tpp") if getattr(cfg, k)]
    if len(budgets) > 1 and "tokens" in budgets and "tokens" not in given:
        cfg.tokens, budgets = 0, [k for k in budgets if k != "tokens"]  # --max_iters or --tpp replace the default
    if len(budgets) != 1:
        raise TrainError(f"give exactly one budget of --max_iters, --tokens, --tpp (got {budgets or 'none'})")
    B = cfg.batch_tokens
    steps = cfg.max_iters or max(1, math.ceil(int(cfg.tokens or cfg.tpp * N) / B))
    D = steps * B
    micro = cfg.micro_batch_tokens or B // world
    for T, _ in seq_lens:
        if micro % T or (B // T) % world or (B // T // world) % (micro // T):
            raise TrainError(f"batch_tokens={B} does not split into {world} rank(s) × micro-batches "
                             f"of micro_batch_tokens={micro} at sequence length {T}")
    batches = data_mod.Batches({d: domains[d] for d in weights}, weights, B, seq_lens, D, cfg.seed)

    # -------- AdamW timescale τ = B/(η·λ·D) (Power Lines, arXiv 2505.13738): a requested τ holds for every
    # decayed group; λ = B/(η·τ·D) at the base LR, and the hidden matrices, at η/m_N, get λ·m_N (mup.py)
    if cfg.tau:
        if cfg.tau == "opt" and cpt is not None:
            raise TrainError("--tau=opt is Power Lines' law for pre-training from scratch (τ_opt of the run's TPP); "
                             "for continual pre-training give --tau a number")
        try:
            tau = mup.tau_opt(D / N) if cfg.tau == "opt" else float(cfg.tau)
        except ValueError:
            tau = None
        if tau is None or not math.isfinite(tau) or tau <= 0:
            raise TrainError(f"--tau={cfg.tau} must be a positive number or 'opt'")
        cfg.weight_decay = mup.weight_decay_for_tau(tau, cfg.lr, B, D)

    # -------- optimizer: AdamW over mup.py's parameter groups, each with its own LR, λ and ε. Under FSDP the groups
    # hold the sharded parameters (DTensors): AdamW is elementwise, so each rank updates its shard with its group's
    # η, λ and ε, exactly as the whole model would be updated
    torch.manual_seed(cfg.seed + rank)
    optimizer = model.configure_optimizers(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                           width_scaled_wd=bool(cfg.tau))
    # τ of every group at its peak LR; the run's τ is the hidden matrices' (almost all parameters, the papers' τ)
    taus = mup.group_taus(optimizer.param_groups, B, D)
    step = 0
    if ck is not None:
        if "dcp" in ck:
            load_sharded(model, optimizer, ck["dcp"])   # an FSDP run's shards, into any strategy and world size
        elif fsdp:
            load_full(model, ck.pop("model"))           # a one-process or DDP run continued under FSDP
            load_full_optimizer(model, optimizer, ck.pop("optimizer"))
        else:
            model.load_state_dict(ck.pop("model"))
            optimizer.load_state_dict(ck.pop("optimizer"))
        step = ck["step"]
        restore_rng(ck.pop("rng"), device, rank, world, cfg.seed, step)
    raw = model
    if device.startswith("cuda"):
        # flex_attention's BlockMask of every sequence length the run meets, built now: made inside a compiled
        # graph, each new length (VSL's switch, evaluation) would be traced into it and recompile
        model_mod.build_flex_masks(sorted({T for T, _ in seq_lens}), device)
    if world > 1 and not fsdp:
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, not a second copy (4 B/param)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None, gradient_as_bucket_view=True)
    if cfg.compile and not fsdp:
        # compile the DDP-wrapped model: DDP(torch.compile(model)) would fire DDP's gradient hooks only after the
        # whole compiled backward, so no all-reduce would overlap computation; compiled around DDP, dynamo splits
        # the graph at bucket boundaries (DDPOptimizer) and each bucket's all-reduce starts as soon as it is ready
        model = torch.compile(model)

    # -------- the run directory: config.json, log.jsonl, the collapse monitor
    # seed 0 for every run: runs of different seeds are scored on the same validation text
    eval_T = seq_lens[0][0]
    val = {d: data_mod.val_batches(ds, eval_T, cfg.eval_batches, max(1, VAL_TOKENS // eval_T), seed=0)
           for d, ds in domains.items()}
    run_info = dict(dataclasses.asdict(cfg), N=N, D=D, TPP=D / N, B=B, steps=steps, tau=taus.get("hidden"),
                    tau_groups=taus, lr_groups={g["name"]: g["lr"] for g in optimizer.param_groups},
                    weight_decay_groups={g["name"]: g["weight_decay"] for g in optimizer.param_groups},
                    n_layer=raw.config.n_layer, n_embd=raw.config.n_embd, n_head=raw.config.n_head,
                    param=raw.config.param, model_config=dataclasses.asdict(raw.config), cpt=cpt,
                    tokenizer=next(iter(domains.values())).tokenizer, world_size=world, code=code_version())
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    # the collapse monitor follows the first domain's validation loss (fixed windows: runs differ by their models,
    # not by their batches), against the reference runs' shape at this run's N
    monitor = CollapseMonitor(cfg.collapse_ref, size=N) if cfg.collapse_ref and master else None
    watched = next(iter(domains))
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json(os.path.join(cfg.out_dir, "config.json"), run_info)
        # a resumed run drops log lines written after its checkpoint, so the log reads as one uninterrupted run
        lines = open(log_path).read().splitlines() if os.path.exists(log_path) and step else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        with atomic(log_path) as tmp, open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        if monitor:  # replay the history so the monitor's fit of this run's scale is the same as without a break
            for r in map(json.loads, kept):
                if "val" in r and r["step"] > 0:
                    monitor.update(r["tokens"] / D, r["val"][watched])
        print(f"{cfg.out_dir}: N={N:,} non-embedding params, D={D:,} tokens ({D / N:.1f} TPP), {steps} steps of "
              f"{B:,} tokens, η={cfg.lr:g}, λ={cfg.weight_decay:.4g}, τ(hidden)={taus.get('hidden') or math.inf:.4g}, "
              f"{raw.config.param}, {device} {cfg.dtype}" + (f", world {world}" if world > 1 else "")
              + (", FSDP" if fsdp else "") + (", activation checkpointing" if cfg.activation_checkpointing else ""))
        if monitor:
            print(f"collapse monitor: validation loss ({watched}) against {monitor.about}")

    def log(rec):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    @torch.no_grad()
    def evaluate():
        model.eval()
        out = {}
        for d, bs in val.items():
            losses = []
            for x, y in bs:
                with autocast:
                    losses.append(raw(x.to(device), y.to(device))[1].item())
            out[d] = sum(losses) / len(losses)
        model.train()
        return out

    def checkpoint():
        meta = dict(step=step, tokens=step * B, config=dataclasses.asdict(cfg),
                    model_config=dataclasses.asdict(raw.config), cpt=cpt, rng=rng_states(device, world))
        if fsdp:
            save_sharded(cfg.out_dir, raw, optimizer, meta, cfg.keep_last)
        elif master:
            save_checkpoint(cfg.out_dir, dict(model=raw.state_dict(), optimizer=optimizer.state_dict(), **meta),
                            cfg.keep_last)

    # -------- the loop: one optimizer step of B tokens at a time, in micro-batches of `micro` tokens per rank
    if step == 0:
        v = evaluate()
        log({"step": 0, "tokens": 0, "val": v})
        if master:
            print("before training: " + ", ".join(f"val {d} {l:.4f}" for d, l in v.items()))
    # a progress bar on a terminal; in a log file (stderr not a terminal) one line per log interval instead
    bar = tqdm(total=steps, initial=step, dynamic_ncols=True) if master and sys.stderr.isatty() else None
    say = bar.write if bar else (print if master else (lambda *a: None))
    peak = cfg.peak_flops or peak_flops_for(device, cfg.dtype)
    t0, tok_since = time.time(), 0
    while step < steps:
        lr_factor = mup.lr_factor(step, steps, cfg.schedule, cfg.warmup, cfg.final_lr_frac, cfg.wsd_decay)
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * g["lr_mult"] * lr_factor
        x, y, T = batches.get(step, rank, world)
        n_micro = x.size(0) // (micro // T)
        loss_sum = torch.zeros((), device=device)
        for i, (xm, ym) in enumerate(zip(x.chunk(n_micro), y.chunk(n_micro))):
            # DDP averages gradients across ranks on the last micro-batch's backward only; FSDP reduce-scatters
            # every micro-batch's gradients into the sharded ones (keeping them whole would cost 4 B/param)
            sync = i == n_micro - 1
            with model.no_sync() if world > 1 and not fsdp and not sync else contextlib.nullcontext():
                with autocast:
                    _, loss = model(xm.to(device), ym.to(device))
                (loss / n_micro).backward()
            loss_sum += loss.detach() / n_micro
        if world > 1:
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        grad_norm = clip_grads(raw.parameters(), cfg.grad_clip)
        lossf = loss_sum.item()
        if not math.isfinite(lossf):
            raise TrainError(f"the loss became {lossf} at step {step}; the last good checkpoint in {cfg.out_dir} "
                             "is kept (lower --lr, or check the data)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tok_since += B
        if bar:
            bar.update(1)
        if step % cfg.log_interval == 0 or step == steps:
            tok_per_s = tok_since / (time.time() - t0)
            # MFU per device: the world's tokens/s shared by its devices, against one device's peak
            rec = {"step": step, "tokens": step * B, "lr": cfg.lr * lr_factor, "loss": lossf, "seq_len": T,
                   "grad_norm": grad_norm.item(), "tok_per_s": tok_per_s,
                   "mfu": raw.estimate_mfu(tok_per_s / world, T, peak)}
            log(rec)
            if bar:
                bar.set_postfix(loss=f"{lossf:.4f}", tok_s=f"{tok_per_s:,.0f}")
            else:
                say(f"step {step}/{steps}: loss {lossf:.4f}, {tok_per_s:,.0f} tok/s, lr {cfg.lr * lr_factor:.3g}")
            t0, tok_since = time.time(), 0
        if step % cfg.eval_interval == 0 or step == steps:
            v = evaluate()
            rec = {"step": step, "tokens": step * B, "val": v}
            if monitor:
                m = monitor.update(step * B / D, v[watched])
                rec["collapse_residual"] = m["smoothed"]
                if m["alert"]:
                    say(m["warning"])
            log(rec)
            say(f"step {step}: " + ", ".join(f"val {d} {l:.4f}" for d, l in v.items()))
        if step % cfg.eval_interval == 0 or step == steps or step == cfg.stop_at:
            checkpoint()
            t0, tok_since = time.time(), 0
        if step == cfg.stop_at:
            break
    if bar:
        bar.close()
    if step == cfg.stop_at and step < steps:
        if master:
            print(f"stopped at step {step} (--stop_at); continue with --init_from=resume --out_dir={cfg.out_dir}")
    elif master and cfg.sample_tokens and fsdp:
        print(f"sample: python sample.py --run={cfg.out_dir} (it gathers the sharded checkpoint)")
    elif master and cfg.sample_tokens:
        enc = data_mod.get_encoding(run_info["tokenizer"])
        start = torch.tensor([[enc.eot_token]], device=device)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast:
            out = raw.generate(start, cfg.sample_tokens, temperature=0.8, top_k=50, generator=g)
        print("sample:\n" + enc.decode(out[0, 1:].tolist()))
    if torch.distributed.is_initialized():
        # every rank waits here for the others (rank 0 may still be writing a checkpoint or a sample), so that no
        # rank tears down its connections while another still uses them: gloo aborted such a rank (SIGABRT)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (TrainError, ConfigError, ModelError, data_mod.DataError, CollapseError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
