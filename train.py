"""
Train a BTLM-style GPT: pre-training under µP / CompleteP with variable sequence length (VSL), or continual
pre-training (CPT) of a trained run on a new domain with replay. One file, nanoGPT style.

    python train.py                                           # tiny µP model on the built-in English prose
    python train.py config/tiny_vsl.py --max_iters=200        # a config file, then --key=value overrides
    python train.py --init_from=out/tiny --out_dir=out/cpt --data=stdlib:0.75,prose:0.25   # CPT, 25% replay
    python train.py --init_from=resume --out_dir=out/tiny     # pick up exactly where a run stopped
    torchrun --standalone --nproc_per_node=2 train.py         # data-parallel (gloo on CPU, NCCL on GPU)

A run lives in out_dir: config.json (every setting, N, D, TPP, B, steps, η, λ, τ per group), log.jsonl (one JSON object a
line) and the last `keep_last` checkpoints ckpt_XXXXXXX.pt, each written to a temporary name and renamed.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data as data_mod
import hf
import mup
from collapse import CollapseError, CollapseMonitor
from configurator import ConfigError, configure
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
    collapse_ref: str = ""            # run dir(s) or CSV of healthy runs: warn when this run leaves their curve
    sample_tokens: int = 200          # sample printed at the end (0: none)
    # system
    seed: int = 1337
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    dtype: str = "float32"            # float32 | bfloat16 (autocast)
    compile: bool = False
    peak_flops: float = 0.0           # for MFU; 0 picks a per-device value (see peak_flops_for)


class TrainError(Exception):
    """A setting or file the run cannot work with (one sentence)."""


# keys a resumed run may change: how it runs, not what it computes
RESUME_KEYS = {"init_from", "out_dir", "stop_at", "device", "compile", "log_interval", "sample_tokens", "collapse_ref"}


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

def checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith("ckpt_") and f.endswith(".pt"))


def save_checkpoint(out_dir, state, keep_last):
    path = os.path.join(out_dir, f"ckpt_{state['step']:07d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)          # a checkpoint that exists is complete
    for old in checkpoints(out_dir)[:-keep_last]:
        os.remove(old)


def load_checkpoint(run_dir):
    ck = checkpoints(run_dir)
    if not ck:
        raise TrainError(f"{run_dir} holds no checkpoint (ckpt_*.pt) to start from")
    try:
        return torch.load(ck[-1], map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"checkpoint {ck[-1]} cannot be read ({type(e).__name__}); delete it to fall back to an older one")


def model_from(ck):
    """The model a checkpoint holds: its config, then its weights."""
    model = GPT(GPTConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


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


def init_model(cfg, ck):
    """(model, cpt): the model to train, from the checkpoint being resumed, from scratch, from Hugging Face, or
    from another run (CPT); cpt describes the base model of a CPT run (None when pre-training)."""
    if ck is not None:
        return model_from(ck), ck["cpt"]
    if cfg.init_from == "scratch":
        over = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "param", "d_base", "L_base") if getattr(cfg, k)}
        if cfg.dropout >= 0:
            over["dropout"] = cfg.dropout
        return GPT(get_preset(cfg.model, **over)), None
    if cfg.init_from.startswith("hf:"):
        model = hf.from_pretrained(cfg.init_from[3:])
        return model, {"init_from": cfg.init_from, "base_N": model.num_params(), "base_D": None, "base_ptpp": None,
                       "base_data": None}
    if os.path.abspath(cfg.init_from) == os.path.abspath(cfg.out_dir):
        raise TrainError("--init_from and --out_dir are the same run; CPT writes a new run directory")
    if not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise TrainError(f"--init_from={cfg.init_from} is neither scratch, resume, hf:<name> nor a run directory")
    base_ck = load_checkpoint(cfg.init_from)
    model = model_from(base_ck)
    base = json.load(open(os.path.join(cfg.init_from, "config.json")))
    # all tokens behind the model: this run's, plus its own base model's when it was itself a CPT run
    base_tokens = base_ck["tokens"] + ((base.get("cpt") or {}).get("base_D") or 0)
    return model, {"init_from": cfg.init_from, "base_N": model.num_params(), "base_D": base_tokens,
                   "base_ptpp": base_tokens / model.num_params(), "base_data": base["data"]}


# ---------------------------------------------------------------------------------------------------------------

def main(argv):
    # -------- settings: defaults, config files, --key=value; a resumed run takes its checkpoint's
    cfg, given = configure(Config, argv)
    if cfg.dtype not in ("float32", "bfloat16"):
        raise TrainError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.schedule not in mup.SCHEDULES:
        raise TrainError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(mup.SCHEDULES)}")
    ck = None
    if cfg.init_from == "resume":
        ck = load_checkpoint(cfg.out_dir)
        saved = ck["config"]
        changed = {k for k in given if k not in RESUME_KEYS and given[k] != saved.get(k)}
        if changed:
            raise TrainError(f"a resumed run keeps its settings; {', '.join(sorted(changed))} differ from "
                             f"{cfg.out_dir}/config.json (only {', '.join(sorted(RESUME_KEYS))} may change)")
        for k, v in saved.items():
            if k not in given or k not in RESUME_KEYS:
                setattr(cfg, k, v)
        cfg.init_from = "resume"
    elif checkpoints(cfg.out_dir):
        raise TrainError(f"{cfg.out_dir} already holds a run; use --init_from=resume or another --out_dir")

    # -------- device and distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    master = rank == 0
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    # -------- model: the same initial weights on every rank
    torch.manual_seed(cfg.seed)
    model, cpt = init_model(cfg, ck)
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

    # -------- optimizer: AdamW over mup.py's parameter groups, each with its own LR, λ and ε
    model.to(device)
    torch.manual_seed(cfg.seed + rank)
    optimizer = model.configure_optimizers(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                           width_scaled_wd=bool(cfg.tau))
    # τ of every group at its peak LR; the run's τ is the hidden matrices' (almost all parameters, the papers' τ)
    taus = mup.group_taus(optimizer.param_groups, B, D)
    step = 0
    if ck is not None:
        optimizer.load_state_dict(ck["optimizer"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"])
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)

    # -------- the run directory: config.json, log.jsonl, the collapse monitor
    # seed 0 for every run: runs of different seeds are scored on the same validation text
    eval_T = seq_lens[0][0]
    val = {d: data_mod.val_batches(ds, eval_T, cfg.eval_batches, max(1, micro // eval_T), seed=0)
           for d, ds in domains.items()}
    run_info = dict(dataclasses.asdict(cfg), N=N, D=D, TPP=D / N, B=B, steps=steps, tau=taus.get("hidden"),
                    tau_groups=taus, lr_groups={g["name"]: g["lr"] for g in optimizer.param_groups},
                    weight_decay_groups={g["name"]: g["weight_decay"] for g in optimizer.param_groups},
                    n_layer=raw.config.n_layer, n_embd=raw.config.n_embd, n_head=raw.config.n_head,
                    param=raw.config.param, model_config=dataclasses.asdict(raw.config), cpt=cpt,
                    tokenizer=next(iter(domains.values())).tokenizer, world_size=world, code=code_version())
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    monitor = CollapseMonitor(cfg.collapse_ref) if cfg.collapse_ref and master else None
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json(os.path.join(cfg.out_dir, "config.json"), run_info)
        # a resumed run drops log lines written after its checkpoint, so the log reads as one uninterrupted run
        lines = open(log_path).read().splitlines() if os.path.exists(log_path) and step else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        with open(log_path + ".tmp", "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(log_path + ".tmp", log_path)
        if monitor:  # replay the history so the monitor's fit of this run's scale is the same as without a break
            for r in map(json.loads, kept):
                if "loss" in r:
                    monitor.update(r["tokens"] / D, r["loss"])
        print(f"{cfg.out_dir}: N={N:,} non-embedding params, D={D:,} tokens ({D / N:.1f} TPP), {steps} steps of "
              f"{B:,} tokens, η={cfg.lr:g}, λ={cfg.weight_decay:.4g}, τ(hidden)={taus.get('hidden') or math.inf:.4g}, "
              f"{raw.config.param}, {device} {cfg.dtype}" + (f", world {world}" if world > 1 else ""))

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
        if master:
            save_checkpoint(cfg.out_dir, dict(model=raw.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                              tokens=step * B, config=dataclasses.asdict(cfg),
                                              model_config=dataclasses.asdict(raw.config), cpt=cpt,
                                              rng=torch.get_rng_state()), cfg.keep_last)

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
            # DDP averages gradients across ranks on the last micro-batch's backward only
            sync = i == n_micro - 1
            with model.no_sync() if world > 1 and not sync else contextlib.nullcontext():
                with autocast:
                    _, loss = model(xm.to(device), ym.to(device))
                (loss / n_micro).backward()
            loss_sum += loss.detach() / n_micro
        if world > 1:
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
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
            if monitor:
                m = monitor.update(rec["tokens"] / D, lossf)
                rec["collapse_residual"] = m["smoothed"]
                if m["alert"]:
                    say(f"collapse monitor: {m['warning']}")
            log(rec)
            if bar:
                bar.set_postfix(loss=f"{lossf:.4f}", tok_s=f"{tok_per_s:,.0f}")
            else:
                say(f"step {step}/{steps}: loss {lossf:.4f}, {tok_per_s:,.0f} tok/s, lr {cfg.lr * lr_factor:.3g}")
            t0, tok_since = time.time(), 0
        if step % cfg.eval_interval == 0 or step == steps:
            v = evaluate()
            log({"step": step, "tokens": step * B, "val": v})
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
    elif master and cfg.sample_tokens:
        enc = data_mod.get_encoding(run_info["tokenizer"])
        start = torch.tensor([[enc.eot_token]], device=device)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast:
            out = raw.generate(start, cfg.sample_tokens, temperature=0.8, top_k=50, generator=g)
        print("sample:\n" + enc.decode(out[0, 1:].tolist()))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (TrainError, ConfigError, ModelError, data_mod.DataError, CollapseError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
