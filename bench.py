"""
Benchmarks: one function per measurement ("section"), each returning a flat dict of results.

    python bench.py                    # every section
    python bench.py --only=scaling     # a comma-separated list of sections
    python bench.py --json             # one JSON line per section, {section: results}
    python bench.py --quick            # fewer repeats, smaller grids (model sections)
    python bench.py --only=mpt --mpt_python=/tmp/benchvenv/bin/python   # the peer's own environment

Each section is printed as soon as it is measured, with its wall time as section_s, after a first "machine" line
(torch, threads, the CPU capability torch dispatches to, load average). To add a section, write
`def bench_<name>()` returning {key: number or text} and add it to SECTIONS.
The dev machine is shared, so sections time each thing more than once and report the best.
"""
import argparse
import json
import os
import sys
import time

# numpy's BLAS on one thread: SciPy's L-BFGS-B makes many tiny BLAS calls, and a threaded OpenBLAS
# made the reference loop 12x slower on the shared dev machine (2.6 ms vs 0.22 ms per evaluation).
# torch keeps its own thread pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def best_time(fn, repeats):
    """Best wall time of `repeats` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def chinchilla_objective(N, D, L, delta):
    """The reference for scaling.fit_law: Chinchilla's summed Huber on log residuals (Besiroglu et al. 2024), written
    independently in numpy with its exact gradient, for SciPy's L-BFGS-B (here and in test_all.py).
    θ = (e, a, b, α, β) with E = e^e, A = e^a, B = e^b."""
    import numpy as np
    lN, lD, lL = np.log(N), np.log(D), np.log(L)

    def objective(th):
        e, a, b, alpha, beta = th
        t = np.stack([np.full_like(lN, e), a - alpha * lN, b - beta * lD])
        w = np.exp(t - t.max(0))
        r = t.max(0) + np.log(w.sum(0)) - lL
        p, dr = w / w.sum(0), np.clip(r, -delta, delta)
        h = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
        return h, np.array([dr @ p[0], dr @ p[1], dr @ p[2], -(dr * p[1]) @ lN, -(dr * p[2]) @ lD])
    return objective


def bench_scaling(points=240, scipy_starts=300, repeats=2, seed=0):
    """Chinchilla Approach 3 on synthetic data: scaling.fit_law's batched L-BFGS over the full 4,500-start grid
    (Hoffmann et al. 2022, Approach 3) against SciPy's L-BFGS-B looped over the same starts, the reference.
    SciPy is timed on a random subset of the starts and extrapolated linearly to all of them."""
    import itertools
    import math
    import numpy as np
    from scipy.optimize import minimize
    import scaling

    # N over 70M-16B params, 2-300 tokens per param, Besiroglu et al. 2024's fit, 1% log-normal noise
    rng = np.random.default_rng(seed)
    truth = dict(E=1.817, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
    N = np.exp(rng.uniform(math.log(7e7), math.log(1.6e10), points))
    D = N * np.exp(rng.uniform(math.log(2), math.log(300), points))
    L = scaling.Fit("chinchilla", truth, 0, 0).predict(N=N, D=D) * np.exp(0.01 * rng.standard_normal(points))

    t_batched, fit = best_time(lambda: scaling.fit_law("chinchilla", dict(N=N, D=D), L), repeats)

    objective = chinchilla_objective(N, D, L, scaling.DELTA)
    grid = scaling.LAWS["chinchilla"].grid
    starts = np.array(list(itertools.product(*(grid[k] for k in ("log_E", "log_A", "log_B", "alpha", "beta")))))
    subset = starts[rng.choice(len(starts), scipy_starts, replace=False)]
    t_sub, results = best_time(lambda: [minimize(objective, s, jac=True, method="L-BFGS-B") for s in subset], repeats)
    t_scipy = t_sub * len(starts) / scipy_starts
    ref = min(results, key=lambda r: r.fun)
    ref_params = dict(E=math.exp(ref.x[0]), A=math.exp(ref.x[1]), B=math.exp(ref.x[2]), alpha=ref.x[3], beta=ref.x[4])
    diff = max(abs(fit.params[k] / v - 1) for k, v in ref_params.items())
    return {
        "points": points, "starts": len(starts),
        "batched_fit_s": round(t_batched, 2),
        "scipy_loop_s": round(t_scipy, 1),
        "scipy_note": f"timed on {scipy_starts} random starts, x{len(starts) / scipy_starts:.0f} linearly",
        "speedup": round(t_scipy / t_batched, 1),
        "batched_loss": fit.loss, "scipy_loss": float(ref.fun),
        "max_param_rel_diff": float(f"{diff:.2g}"),
        "same_optimum": bool(diff < 1e-3 and fit.loss <= ref.fun * (1 + 1e-6)),
        **{f"fit_{k}": round(v, 4) for k, v in fit.params.items()},
    }


# ---- model performance (issue: "bench.py, the fast paths, and throughput / MFU / memory measured side by side") ----
# Every ratio below is measured back to back in one process, so the machine's load (shared, noisy) cancels out
# as far as it can; absolute tok/s are only comparable within one run.
QUICK = False          # --quick: fewer repeats, smaller grids and shorter sequences (under 5 min on the dev machine)
MPT_PYTHON = None      # --mpt_python=PATH: an interpreter that can import transformers (the MPT peer)
D384 = dict(n_layer=6, n_head=6, n_embd=384, vocab_size=50304)  # the 6-layer, d = 384 model, GPT-2-sized vocab


def tokens_per_step():
    return 512 if QUICK else 4096
_peaks = {}


def _torch_setup():
    import os
    import torch
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  ".cache", "inductor"))
    torch.manual_seed(0)
    return torch


def peak_flops(dtype_name):
    """Best matmul FLOP/s of a 2048² · 2048² product (2·n³ FLOPs) in this dtype: the denominator of MFU."""
    torch = _torch_setup()
    if dtype_name not in _peaks:
        dtype = getattr(torch, dtype_name)
        # a 256² probe first: without AVX-512 BF16 / AMX, CPU bf16 matmuls fall back to a path ~1,000x slower
        # than fp32 (0.4 GFLOP/s on an AVX2-only host), where a 2048² product would take 40 s
        for n in ((256, 2048) if dtype == torch.bfloat16 else (2048,)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            t, _ = best_time(lambda: a @ b, 3 if n == 256 else 5 if QUICK else 10)
            _peaks[dtype_name] = 2 * n ** 3 / t
            if _peaks[dtype_name] < 20e9:
                break
    return _peaks[dtype_name]


def dtypes():
    """fp32, and bf16 autocast unless this CPU's bf16 matmul is slower than fp32's (then bf16 runs are skipped)."""
    return ("fp32", "bf16") if peak_flops("bfloat16") > peak_flops("float32") else ("fp32",)


def bench_peak():
    import torch
    return {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "fp32_GFLOPs": round(peak_flops("float32") / 1e9, 1),
            "bf16_GFLOPs": round(peak_flops("bfloat16") / 1e9, 2),
            "bf16_runs": "yes" if "bf16" in dtypes() else "skipped: bf16 matmul is slower than fp32 on this CPU"}


def _gpt(T, impl="sdpa", preset=None, device="cpu", **shape):
    import model
    cfg = model.get_preset(preset, block_size=T, attn_impl=impl) if preset else \
        model.GPTConfig(block_size=T, attn_impl=impl, **shape)
    return model.GPT(cfg).to(device)


def _step_fn(m, T, B, dtype, compiled, device="cpu", vocab=None):
    """One training step (forward, backward, fused AdamW) on a fixed random batch; returns a callable."""
    import torch
    vocab = vocab or m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(vocab, (B, T), generator=g).to(device)
    y = torch.randint(vocab, (B, T), generator=g).to(device)
    opt = m.configure_optimizers(1e-3, 0.1) if hasattr(m, "configure_optimizers") else \
        torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    fwd = torch.compile(m) if compiled else m
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with amp:
            loss = fwd(x, targets=y)[1] if hasattr(m, "configure_optimizers") else fwd(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def _rate(step, tokens, warmup=1, steps=None):
    """Training tok/s: best of `steps` timed steps after `warmup` untimed ones (the first compiles)."""
    for _ in range(warmup):
        step()
    t, _ = best_time(step, steps or (2 if QUICK else 4))
    return tokens / t


def _alternate(steps, rounds):
    """Best time of each callable in {name: step}, timed in turns (A, B, A, B, ...) so that the shared machine's
    load changes hit all of them alike; each is called once first (a warm-up, and the compile where there is one)."""
    for step in steps.values():
        step()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], best_time(step, 1)[0])
    return best


def bench_train():
    """Training tok/s and MFU (against bench_peak's matmul peak of the same dtype) of the tiny preset and the
    6-layer d = 384 model, fp32 and bf16 autocast, eager and torch.compile'd, at a constant tokens_per_step()
    (--quick: the d = 384 model at T = 256, compiled in one dtype only: a compile takes a minute on a loaded host)."""
    torch = _torch_setup()
    out, runs = {}, []
    grid, n = [("d384", 256)] if QUICK else [("tiny", 256), ("d384", 256), ("d384", 1024)], tokens_per_step()
    for name, T in grid:
        for dtype in dtypes():
            models, steps = {}, {}
            compiled = not QUICK or dtype == dtypes()[-1]  # --quick compiles in the last dtype (bf16 where it runs)
            for mode in ("eager", "compiled") if compiled else ("eager",):  # in turns: load cannot move their ratio
                torch.manual_seed(0)
                models[mode] = _gpt(T, preset="tiny") if name == "tiny" else _gpt(T, **D384)
                steps[mode] = _step_fn(models[mode], T, n // T, dtype, mode == "compiled")
            for mode, t in _alternate(steps, 1 if QUICK else 4).items():
                key = f"{name}_T{T}_{dtype}_{mode}"
                out[key + "_tok_s"] = round(n / t)
                runs.append((key, models[mode], n / t, T, dtype))
            torch._dynamo.reset()
    # the peak again after the runs, keeping the best: other jobs' load moves it by 2-3x on the shared machine, and an
    # MFU against a peak measured under heavier load than the run itself would exceed 1
    old = dict(_peaks)
    _peaks.clear()
    for k, v in old.items():
        _peaks[k] = max(v, peak_flops(k))
    for key, m, rate, T, dtype in runs:
        out[key + "_mfu"] = round(m.estimate_mfu(rate, T, _peaks["bfloat16" if dtype == "bf16" else "float32"]), 3)
    out["fp32_peak_GFLOPs"] = round(_peaks["float32"] / 1e9, 1)
    return out


def bench_alibi():
    """ALiBi's cost: the d = 384 model with SDPA + the per-key fp32 bias against plain causal SDPA (no bias),
    eager, trained alternately (A, B, A, B, ...) so that load changes hit both; ratio = ALiBi time / causal time.
    T = 256 and 1,024 (--quick: 512)."""
    torch = _torch_setup()
    out, n = {}, tokens_per_step()
    for T in (512,) if QUICK else (256, 1024):
        for dtype in dtypes():
            steps = {}
            for impl in ("sdpa", "causal"):
                torch.manual_seed(0)
                steps[impl] = _step_fn(_gpt(T, impl, **D384), T, n // T, dtype, False)
            best = _alternate(steps, 1 if QUICK else 6)
            out[f"T{T}_{dtype}_alibi_tok_s"] = round(n / best["sdpa"])
            out[f"T{T}_{dtype}_causal_tok_s"] = round(n / best["causal"])
            out[f"T{T}_{dtype}_overhead"] = round(best["sdpa"] / best["causal"] - 1, 3)
    return out


def mpt_rates(T, B, dtype):
    """tok/s of our d = 384 model and of Hugging Face's MPT (ALiBi) at the same shape, one training step each on the
    same batch shape, alternated (ours, MPT, ours, ...) in one process so that the shared machine's load hits both.
    Runs in the peer's environment: bench_mpt calls it through a subprocess, so transformers never enters ours."""
    _torch_setup()
    from transformers import MptConfig, MptForCausalLM
    cfg = MptConfig(d_model=D384["n_embd"], n_heads=D384["n_head"], n_layers=D384["n_layer"],
                    vocab_size=D384["vocab_size"], max_seq_len=T, expansion_ratio=4, attn_config={"alibi": True})
    peer = MptForCausalLM(cfg)
    peer.config.use_cache = False
    steps = {"ours": _step_fn(_gpt(T, **D384), T, B, dtype, False), "mpt": _step_fn(peer, T, B, dtype, False)}
    best = _alternate(steps, 2 if QUICK else 4)
    return {name: B * T / t for name, t in best.items()}


def _subprocess_json(python, code, timeout=900):
    """Run `code` (which prints one JSON line last) in a fresh interpreter in this folder; its parsed output."""
    import os
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([python, "-c", f"import sys; sys.path.insert(0, {here!r}); " + code], cwd=here,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_mpt():
    """Our d = 384 model (SDPA + per-key ALiBi) against HF transformers' MPT of the same shape (ALiBi, 6 layers,
    d = 384, vocabulary 50,304; its eager attention builds the (T, T) scores), one eager training step each with
    the same tokens, at T = 256, 2,048 and 4,096 (--quick: 256 and 1,024). ratio = our tok/s / MPT's."""
    import importlib.util
    python = MPT_PYTHON or (sys.executable if importlib.util.find_spec("transformers") else None)
    if python is None:
        return {"skipped": "the MPT peer is unavailable: transformers is not importable here; pass "
                           "--mpt_python=/path/to/python of a venv that has it (README: benchmark setup)"}
    out = {"mpt_python": python}
    for T in (256, 1024) if QUICK else (256, 2048, 4096):
        B = max(1, tokens_per_step() // T)
        for dtype in dtypes():
            try:
                r = _subprocess_json(python, f"import bench, json; bench.QUICK = {QUICK}; "
                                             f"print(json.dumps(bench.mpt_rates({T}, {B}, {dtype!r})))")
            except Exception as e:  # the peer's failure is a result to show, not a crash of the whole bench
                out[f"T{T}_{dtype}_mpt_error"] = str(e)[:200]
                continue
            ours, peer = r["ours"], r["mpt"]
            out[f"T{T}_{dtype}_ours_tok_s"], out[f"T{T}_{dtype}_mpt_tok_s"] = round(ours), round(peer)
            out[f"T{T}_{dtype}_ratio"] = round(ours / peer, 2)
    return out


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_step(what, T, B):
    """In a fresh process: resident-memory high-water mark (VmHWM) of one fwd+bwd (+ AdamW for "model") minus the RSS
    just before it, in MiB. The kernel's RSS sees torch's CPU allocations, which tracemalloc does not; writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS, so peaks of imports and model building do not count."""
    torch = _torch_setup()
    import model
    if what == "model":
        m = _gpt(T, **D384)
        step = _step_fn(m, T, B, "fp32", False)
    else:  # one attention layer of the d = 384 model, "sdpa" or "naive"
        cfg = model.GPTConfig(block_size=T, attn_impl=what, **D384)
        layer = model.CausalSelfAttention(cfg, scale=(cfg.n_embd // cfg.n_head) ** -1.0)
        x = torch.randn(B, T, cfg.n_embd, requires_grad=True)

        def step():
            layer(x).sum().backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) / 1024


def _peak_mib(what, T, B):
    return _subprocess_json(sys.executable,
                            f"import bench, json; print(json.dumps(bench.peak_rss_step({what!r}, {T}, {B})))")


def bench_memory():
    """Peak memory of one training step of the d = 384 model (fp32, SDPA + per-key ALiBi) at T = 8,192 against
    four sequences of 2,048: the same 8,192 tokens, so only attention's T-dependence differs. A fresh process per
    configuration; MiB above the RSS after the model was built. (--quick: 1,024 against four of 256.)"""
    T = 1024 if QUICK else 8192
    long, short = _peak_mib("model", T, 1), _peak_mib("model", T // 4, 4)
    return {f"T{T}x1_MiB": round(long), f"T{T // 4}x4_MiB": round(short), "ratio": round(long / short, 2)}


def bench_attention():
    """Attention layer alone (model.CausalSelfAttention, d = 384, 6 heads, batch 1): forward+backward time of
    path (a), SDPA with the per-key fp32 ALiBi bias, against the naive (H, T, T) reference, at T = 1,024 and 4,096
    (--quick: 2,048), and path (a)'s peak memory at T = 8,192 against four sequences of 2,048 (fresh process each)."""
    torch = _torch_setup()
    import model
    out = {}
    for T in (1024, 2048) if QUICK else (1024, 4096):
        times = {}
        for impl in ("sdpa", "naive"):
            cfg = model.GPTConfig(block_size=T, attn_impl=impl, **D384)
            torch.manual_seed(0)
            layer = model.CausalSelfAttention(cfg, scale=(cfg.n_embd // cfg.n_head) ** -1.0)
            x = torch.randn(1, T, cfg.n_embd, requires_grad=True)
            times[impl], _ = best_time(lambda: layer(x).sum().backward(), 2 if QUICK else 5)
        out[f"T{T}_sdpa_ms"], out[f"T{T}_naive_ms"] = round(times["sdpa"] * 1e3, 1), round(times["naive"] * 1e3, 1)
        out[f"T{T}_speedup"] = round(times["naive"] / times["sdpa"], 2)
    long, short = _peak_mib("sdpa", 8192, 1), _peak_mib("sdpa", 2048, 4)
    out.update(sdpa_T8192x1_MiB=round(long), sdpa_T2048x4_MiB=round(short), sdpa_memory_ratio=round(long / short, 2))
    return out


def bench_generate():
    """Greedy generation of 512 new tokens (--quick: 32; batch 1, 16-token prompt) with the KV cache against
    recomputing the whole prefix every step, for the d = 384 model; ratio = cached tok/s / recomputed tok/s."""
    torch = _torch_setup()
    n = 32 if QUICK else 512
    m = _gpt(1024, **D384).eval()
    idx = torch.randint(D384["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    t_kv, a = best_time(lambda: m.generate(idx, n, temperature=0, use_cache=True), 2)  # the first call warms up
    t_re, b = best_time(lambda: m.generate(idx, n, temperature=0, use_cache=False), 2)
    return {"new_tokens": n, "kv_tok_s": round(n / t_kv, 1), "recompute_tok_s": round(n / t_re, 1),
            "ratio": round(t_re / t_kv, 1), "same_tokens": bool(torch.equal(a, b))}


def bench_gpu():
    """On a CUDA device: flex_attention ALiBi against plain causal SDPA (forward+backward of one attention layer,
    bf16, T = 8,192), and the training MFU of a 124M GPT-2-shaped model (12 layers, d = 768) in bf16, compiled,
    against the device's measured bf16 matmul peak."""
    torch = _torch_setup()
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    torch.backends.cuda.matmul.allow_tf32 = True
    import model
    out = {"device": torch.cuda.get_device_name()}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t, _ = best_time(lambda: (a @ a, torch.cuda.synchronize()), 10)
    peak = 2 * n ** 3 / t
    out["bf16_peak_TFLOPs"] = round(peak / 1e12, 1)
    # each part records its own error: it has never run on a GPU in this project, and one failure should not cost
    # the other numbers of a short GPU session
    T, times = 8192, {}
    for impl in ("flex", "causal"):
        try:
            cfg = model.GPTConfig(block_size=T, attn_impl=impl, n_layer=1, n_head=12, n_embd=768)
            layer = model.CausalSelfAttention(cfg, scale=64 ** -0.5).to("cuda", torch.bfloat16)
            x = torch.randn(4, T, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)

            def fb():
                layer(x).sum().backward()
                torch.cuda.synchronize()
            fb()
            times[impl], _ = best_time(fb, 10)
            out[f"T8192_{impl}_ms"] = round(times[impl] * 1e3, 2)
        except Exception as e:
            out[f"T8192_{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if len(times) == 2:
        out["flex_over_causal"] = round(times["flex"] / times["causal"], 2)
    T, B = 1024, 16
    for impl in ("auto", "sdpa"):  # auto = flex_attention on CUDA; sdpa = the per-key bias mask, as on CPU
        try:
            torch._dynamo.reset()
            m = _gpt(T, impl, device="cuda", n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
            rate = _rate(_step_fn(m, T, B, "bf16", True, device="cuda"), B * T, warmup=3, steps=10)
            out.update({"gpt124m_N": m.num_params(), f"gpt124m_{impl}_tok_s": round(rate),
                        f"gpt124m_{impl}_mfu": round(m.estimate_mfu(rate, T, peak), 3)})
        except Exception as e:
            out[f"gpt124m_{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


SECTIONS = {"scaling": bench_scaling, "peak": bench_peak, "train": bench_train, "alibi": bench_alibi,
            "mpt": bench_mpt, "memory": bench_memory, "attention": bench_attention, "generate": bench_generate,
            "gpu": bench_gpu}


def sections(text):
    names = text.split(",")
    if unknown := [n for n in names if n not in SECTIONS]:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r}; the sections: {', '.join(SECTIONS)}")
    return names


def python_file(path):
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path} is not a file")
    return path


if __name__ == "__main__":
    from configurator import ArgumentParser
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", type=sections, default=",".join(SECTIONS), help="the sections to run, comma-separated")
    p.add_bool("--json", help="print one JSON line per section, {section: results}")
    p.add_bool("--quick", help="fewer repeats, fewer tokens a step and a smaller grid in the model sections")
    p.add_argument("--mpt_python", type=python_file, help="a python that imports transformers, for the mpt section")
    args = p.parse_args()
    QUICK, MPT_PYTHON = args.quick, args.mpt_python

    def show(name, result):  # printed as soon as it is measured, so a run stopped half-way keeps what it measured
        if args.json:
            print(json.dumps({name: result}), flush=True)
        else:
            print(f"== {name}\n" + "\n".join(f"  {k:<20} {v}" for k, v in result.items()), flush=True)
    import torch
    show("machine", {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average": os.getloadavg()})
    failed = False
    for name in args.only:
        t0 = time.perf_counter()
        try:
            result = SECTIONS[name]()
        except Exception as e:  # one section's failure is its result; the others still run
            result, failed = {"error": f"{type(e).__name__}: {str(e)[:300]}"}, True
        show(name, dict(result, section_s=round(time.perf_counter() - t0, 1)))
    sys.exit(1 if failed else 0)
