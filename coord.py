"""
The coordinate check (Yang et al. 2022, Tensor Programs V §D.1), the standard test of a parameterisation: train a
few steps on a fixed batch and watch mean |activation| against width. Under a correct µP every curve is flat; under
SP hidden activations and logits grow with width after the first update. The depth variant does the same against
depth for CompleteP.

    python coord.py --param=mup --widths=64,128,256,512 --steps=10 --plot=coord.png --json
    python coord.py --param=sp --widths=64,128,256,512 --plot=coord_sp.png
    python coord.py --param=completep --depths=2,4,8,16 --json
"""
import json
import math
import sys

import torch

from configurator import ArgumentParser, save_figure
from model import GPT, GPTConfig
from mup import PARAMS, MupError, param_groups

def coord_check(param="mup", widths=(64, 128, 256, 512), depths=None, steps=10, lr=1e-3, n_layer=2, n_embd=128,
                n_head=4, seq_len=64, batch_size=8, seed=0):
    """Returns {"param", "widths" or "depths", "records": {kind: [[mean|x| per step] per size]}, "slopes": {...}}.

    A record is mean |activation| of: the embedding output, each attention output and each MLP output (before
    they join the residual stream, max over layers), the last block's output ("residual") and the logits.
    slopes[kind] = max over steps ≥ 1 of |d log(mean|x|) / d log(size)| (least-squares fit).
    """
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
    save_figure(fig, path)


def ints(text):
    return tuple(int(v) for v in text.split(","))


def main(argv):
    c = ArgumentParser(description=__doc__)
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
    f = c.parse_args(argv)
    if f.steps < 1:
        raise MupError(f"--steps must be at least 1, got {f.steps}")
    r = coord_check(f.param, widths=f.widths, depths=f.depths, steps=f.steps, lr=f.lr,
                    n_layer=f.n_layer, n_embd=f.n_embd, seed=f.seed)
    if f.plot:
        plot_coord(r, f.plot)
    if f.json:
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
