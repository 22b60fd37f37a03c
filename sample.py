"""
Sample from a trained run (its last checkpoint) or a Hugging Face BTLM checkpoint, or export a run to Hugging Face.

    python sample.py --run=out/tiny --start="def " --num_samples=3 --max_new_tokens=300
    python sample.py --run=hf:cerebras/btlm-3b-8k-base --start="The capital of France" --dtype=bfloat16
    python sample.py --run=out/btlm --export=out/btlm-hf      # any run, FSDP's sharded checkpoints included

A run's checkpoint is a ckpt_*.pt file or, for FSDP runs, a folder of Distributed Checkpoint shards, which is
gathered here into one whole model in this process, whatever the number of ranks that wrote it.
"""
import json
import os
import sys
from dataclasses import dataclass

import torch

import data as data_mod
import hf
from configurator import ConfigError, configure
from model import ModelError
from train import TrainError, load_checkpoint, model_from


@dataclass
class SampleConfig:
    run: str = "out/tiny"           # a run directory, or hf:<repo or local HF folder>
    start: str = ""                 # prompt text; "" starts from <|endoftext|>; FILE:path reads a file
    num_samples: int = 1
    max_new_tokens: int = 200       # any length: ALiBi has no position table
    temperature: float = 0.8        # 0 is greedy
    top_k: int = 50                 # 0 keeps the whole vocabulary
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"          # float32 | bfloat16
    export: str = ""                # write the model in Hugging Face BTLM format to this folder and exit


def load_model(run, device, dtype=torch.float32):
    """(model, tiktoken encoding) from a run directory or hf:<name>."""
    if run.startswith("hf:"):
        model = hf.from_pretrained(run[3:], dtype=dtype, device=device)
        return model.to(device).eval(), data_mod.get_encoding("gpt2")
    cfg_path = os.path.join(run, "config.json")
    if not os.path.isfile(cfg_path):
        raise TrainError(f"{run} is not a run directory (no config.json)")
    model = model_from(load_checkpoint(run))
    return model.to(device=device, dtype=dtype).eval(), data_mod.get_encoding(json.load(open(cfg_path))["tokenizer"])


def main(argv):
    cfg, _ = configure(SampleConfig, argv)
    if cfg.dtype not in ("float32", "bfloat16"):
        raise TrainError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, enc = load_model(cfg.run, device, getattr(torch, cfg.dtype))
    if cfg.export:
        hf.save_pretrained(model, cfg.export)
        print(f"{cfg.export}: config.json and model.safetensors in Hugging Face BTLM format ({cfg.dtype})")
        return
    text = cfg.start
    if text.startswith("FILE:"):
        with open(text[5:], encoding="utf-8") as f:
            text = f.read()
    ids = enc.encode(text, allowed_special={"<|endoftext|>"}) if text else [enc.eot_token]
    if max(ids) >= model.config.vocab_size:
        raise TrainError(f"the prompt has token id {max(ids)} but the model's vocabulary is {model.config.vocab_size}")
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    for _ in range(cfg.num_samples):
        y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None, generator=g)
        print(enc.decode(y[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (TrainError, ConfigError, ModelError, data_mod.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
