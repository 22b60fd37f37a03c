"""
Hugging Face BTLM checkpoints in and out of model.py's GPT: cerebras/btlm-3b-8k-base (Dey et al. 2023, arXiv
2309.11568) and any folder in its format.

    import hf
    model = hf.from_pretrained("cerebras/btlm-3b-8k-base", dtype=torch.bfloat16)   # a Hub repo id or a local folder
    hf.save_pretrained(model, "out/btlm-cpt")                                     # config.json + model.safetensors

The format. modeling_btlm.py (the remote code of cerebras/btlm-3b-8k-base) is GPT-2's code plus µP multipliers,
SwiGLU and ALiBi, and its state-dict names are model.py's, with two differences: its five block matrices are GPT-2
Conv1D modules, which store a weight as (in, out), the transpose of nn.Linear's (out, in) (as the Cerebras and vLLM
converters treat them), and the fixed ALiBi slopes are saved as a (H, 1) tensor. Position interpolation
(alibi_scaling) is not supported. Weights come as model.safetensors, pytorch_model.bin, or shards of either listed in
a .index.json; the optional packages safetensors (the .safetensors files) and huggingface_hub (Hub downloads) are
imported only when needed.
"""
import json
import os

import torch

from configurator import atomic
from model import GPT, GPTConfig, ModelError, alibi_slopes
from mup import BTLM_ALPHA_IN, BTLM_ALPHA_OUT, BTLM_D_BASE

HF_SLOPES = "transformer.relative_pe.slopes"
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_fc2.weight", "mlp.c_proj.weight")
# config keys with one supported value: key → (BTLM's value, the value HF's config class assumes when it is absent)
HF_FIXED = {"activation_function": ("swiglu", "gelu_new"), "position_embedding_type": ("alibi", "learned"),
            "scale_attn_weights": (True, True), "scale_attn_by_inverse_layer_idx": (False, False),
            "add_cross_attention": (False, False), "tie_word_embeddings": (True, True), "alibi_scaling": (None, None)}


def config_from_hf(hf):
    """GPTConfig of a BTLM config.json dict. The µP keys map onto mup.py's multipliers: HF scales the logits by
    mup_output_alpha·mup_width_scale = α_out/m_N, so m_N = 1/mup_width_scale and d_base = n_embd·mup_width_scale;
    α_in = mup_embeddings_scale; σ = initializer_range; mup_scale_qk_dot_by_d picks 1/d_head over 1/√d_head.
    With the four mup_* keys absent or neutral (1, 1, 1, false) the model is SP. n_inner null is 4·n_embd (GPT-2)."""
    if not isinstance(hf, dict):
        raise ModelError(f"a Hugging Face config must be a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "btlm") != "btlm":
        raise ModelError(f"config key model_type is {hf['model_type']!r}, not 'btlm'")
    for key, (want, absent) in HF_FIXED.items():
        if hf.get(key, absent) != want:
            got = f"{hf[key]!r}" if key in hf else f"missing (so HF's default {absent!r})"
            raise ModelError(f"config key {key} is {got}, but a BTLM model needs {want!r}")

    def num(key, default=None, integer=False, positive=True):
        if key not in hf and default is None:
            raise ModelError(f"config key {key} is missing")
        v = hf.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or v < 0 or (positive and v == 0):
            raise ModelError(f"config key {key} is {v!r}, not a {'positive' if positive else 'non-negative'} "
                             f"{'integer' if integer else 'number'}")
        return v
    d = num("n_embd", integer=True)
    width, alpha_in, alpha_out = (float(num(k, 1.0))
                                  for k in ("mup_width_scale", "mup_embeddings_scale", "mup_output_alpha"))
    by_d = hf.get("mup_scale_qk_dot_by_d", False)
    if not isinstance(by_d, bool):
        raise ModelError(f"config key mup_scale_qk_dot_by_d is {by_d!r}, not true or false")
    mup = (width, alpha_in, alpha_out, by_d) != (1.0, 1.0, 1.0, False)
    d_base = d * width
    if abs(d_base - round(d_base)) < 1e-9 * d_base:
        d_base = round(d_base)  # 2560 · 0.1 → 256, so a save → load round trip gives back the same GPTConfig
    power = 1.0 if by_d else 0.5
    return GPTConfig(block_size=num("n_positions", 1024, integer=True), vocab_size=num("vocab_size", integer=True),
                     n_layer=num("n_layer", integer=True), n_head=num("n_head", integer=True), n_embd=d,
                     n_inner=4 * d if hf.get("n_inner") is None else num("n_inner", integer=True),
                     dropout=float(num("resid_pdrop", 0.0, positive=False)),
                     ln_eps=float(num("layer_norm_epsilon", 1e-5)), param="mup" if mup else "sp",
                     d_base=d_base if mup else BTLM_D_BASE, sigma=float(num("initializer_range", 0.02)),
                     alpha_in=alpha_in if mup else BTLM_ALPHA_IN, alpha_out=alpha_out if mup else BTLM_ALPHA_OUT,
                     attn_scale_power=None if power == (1.0 if mup else 0.5) else power)


def to_hf_config(model):
    """The config.json dict of to_hf_state_dict(model): the keys of cerebras/btlm-3b-8k-base's config.json (µP:
    mup_width_scale = 1/m_N), plus auto_map to BTLM's remote code so that transformers loads a saved folder with
    trust_remote_code=True."""
    c, pz = model.config, model.pz
    if pz.residual_mult != 1.0:
        raise ModelError(f"CompleteP's residual multiplier 1/m_L (n_layer={c.n_layer}, L_base={c.L_base}) has no "
                         f"BTLM config key, so this model cannot be saved in Hugging Face BTLM format")
    power = pz.attn_scale_power if c.attn_scale_power is None else c.attn_scale_power
    if power not in (0.5, 1.0):
        raise ModelError(f"attention scale 1/d_head^{power} has no BTLM config key "
                         f"(mup_scale_qk_dot_by_d gives 1 or 0.5)")
    mup, code = c.param != "sp", "cerebras/btlm-3b-8k-base--"
    return {"model_type": "btlm", "architectures": ["BTLMLMHeadModel"],
            "auto_map": {"AutoConfig": code + "configuration_btlm.BTLMConfig",
                         "AutoModel": code + "modeling_btlm.BTLMModel",
                         "AutoModelForCausalLM": code + "modeling_btlm.BTLMLMHeadModel"},
            "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": c.n_inner, "activation_function": "swiglu",
            "position_embedding_type": "alibi", "layer_norm_epsilon": c.ln_eps, "initializer_range": c.sigma,
            "embd_pdrop": c.dropout, "resid_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "scale_attn_weights": True, "tie_word_embeddings": True,
            "mup_width_scale": c.d_base / c.n_embd if mup else 1.0,
            "mup_embeddings_scale": c.alpha_in if mup else 1.0, "mup_output_alpha": c.alpha_out if mup else 1.0,
            "mup_scale_qk_dot_by_d": power == 1.0,
            "torch_dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch.")}


def to_hf_state_dict(model, conv1d=True):
    """The model's weights under HF BTLM names: block matrices as Conv1D (in, out) when conv1d (transposed copies),
    lm_head.weight tied to transformer.wte.weight, and the ALiBi slopes as transformer.relative_pe.slopes (H, 1), as
    modeling_btlm.py keeps them. Tensors that need no transpose share memory with the model."""
    sd = {k: (t.t().contiguous() if conv1d and k.endswith(HF_CONV1D) else t)
          for k, t in model.state_dict(keep_vars=False).items()}
    sd[HF_SLOPES] = alibi_slopes(model.config.n_head).view(-1, 1).to(model.transformer.wte.weight.device)
    return sd


def from_hf_state_dict(state_dict, hf_config, conv1d=True, dtype=torch.float32, device="cpu"):
    """A GPT from an HF BTLM state dict and its config.json dict (config_from_hf maps the keys). Matrices whose two
    dims differ are oriented by shape; square ones (attn.c_proj) are read as GPT-2 Conv1D, (in, out), when conv1d, as
    modeling_btlm.py's Conv1D modules store them, else as nn.Linear's (out, in). Weights are copied."""
    return _load_hf(dict(state_dict), hf_config, conv1d, dtype, device, copy=True)


def from_pretrained(name, dtype=torch.float32, device="cpu", conv1d=True):
    """Load "cerebras/btlm-3b-8k-base" or any HF BTLM checkpoint: a local folder (config.json with model.safetensors
    or pytorch_model.bin, or shards listed in their .index.json) or a Hub repo id, downloaded through the optional
    huggingface_hub (safetensors preferred). The model is built on the meta device and takes the checkpoint's tensors
    one at a time, so the weights are held once; tensors needing no transpose or cast stay memory-mapped
    (copy-on-write: training never writes to the file)."""
    folder = _hf_folder(name)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{os.path.join(folder, 'config.json')} cannot be read as JSON ({e})") from None
    sd = _read_weights(folder)
    try:
        return _load_hf(sd, hf, conv1d, dtype, device, copy=False)
    except ModelError as e:
        raise ModelError(f"{folder}: {e}") from None


def save_pretrained(model, folder):
    """config.json and model.safetensors in HF BTLM format, read back exactly by from_pretrained. Each file is
    written to a temporary name and renamed; config.json comes last, so it marks a complete save."""
    hf = to_hf_config(model)  # fails before anything is written when the model has no BTLM equivalent
    save_file = _safetensors("saving in Hugging Face format").torch.save_file
    sd = to_hf_state_dict(model)
    del sd["lm_head.weight"]  # tied: safetensors holds no aliased tensors; loaders take transformer.wte.weight
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    with atomic(path) as tmp:
        save_file({k: t.detach().cpu().contiguous() for k, t in sd.items()}, tmp, metadata={"format": "pt"})
    with atomic(os.path.join(folder, "config.json")) as tmp, open(tmp, "w") as f:
        json.dump(hf, f, indent=2)


def _load_hf(sd, hf, conv1d, dtype, device, copy):
    """GPT from an HF state dict, which is consumed: each tensor is popped, oriented, cast and moved on its own, into a
    model built on the meta device, so a 3B checkpoint is never held twice. copy=False lets tensors that need no
    change become the parameters themselves (memory-mapped files stay mapped)."""
    config = config_from_hf(hf)
    with torch.device("meta"):
        model = GPT(config)
    raw_wte, ours = sd.get("transformer.wte.weight"), {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t, want = sd.pop(name, None), tuple(p.shape)
        if not isinstance(t, torch.Tensor):
            raise ModelError(f"the checkpoint is missing {name}" if t is None else f"{name} is not a tensor")
        if name.endswith(HF_CONV1D) and tuple(t.shape) == want[::-1] and (want[0] != want[1] or conv1d):
            t = t.t()  # Conv1D (in, out) → nn.Linear (out, in)
        elif tuple(t.shape) != want:
            alt = f" or its transpose {want[::-1]}" if name.endswith(HF_CONV1D) else ""
            raise ModelError(f"{name} has shape {tuple(t.shape)}, but the config needs {want}{alt}")
        if copy or not t.is_contiguous() or t.dtype != dtype or t.device != torch.device(device):
            # one pass that transposes, casts and moves; a transposed view would make bf16 matmuls ~18x slower on CPU
            t = torch.empty(t.shape, dtype=dtype, device=device).copy_(t)
        ours[name] = t
    tied, slopes = sd.pop("lm_head.weight", None), sd.pop(HF_SLOPES, None)
    extra = sorted(k for k in sd if not k.endswith((".attn.bias", ".attn.masked_bias")))  # GPT-2's causal-mask buffers
    if extra:
        raise ModelError(f"the checkpoint has {len(extra)} unexpected key(s), the first being {extra[0]}")
    if tied is not None and (tied.shape != raw_wte.shape or not torch.equal(tied, raw_wte.to(tied.dtype))):
        raise ModelError("lm_head.weight differs from transformer.wte.weight, but BTLM ties its input and output "
                         "embeddings")
    ref = alibi_slopes(config.n_head)
    if slopes is not None:
        stored = slopes.float().reshape(-1).cpu()
        if stored.numel() != config.n_head or not torch.allclose(stored, ref, rtol=1e-6, atol=0):
            raise ModelError(f"{HF_SLOPES} holds ALiBi slopes {[round(s, 6) for s in stored.tolist()]}, "
                             f"but {config.n_head} heads have {[round(s, 6) for s in ref.tolist()]}")
    ours["lm_head.weight"] = ours["transformer.wte.weight"]
    model.load_state_dict(ours, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True made two Parameters of one tensor: tie again
    # the non-persistent slopes were left on the meta device. They stay fp32 under bf16 weights (m_h·j is off by whole
    # units in bf16 at long context; CausalSelfAttention._apply) but follow a float64 model: torch 2.13's CPU SDPA
    # silently mis-reads an fp32 attn_mask next to float64 queries.
    for block in model.transformer.h:
        block.attn.slopes = ref.to(device=device, dtype=torch.promote_types(dtype, torch.float32))
    return model


def _hf_folder(name):
    """A local folder as it is; an owner/name Hub repo id downloaded (config and weights only) by huggingface_hub."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelError(f"{name} is neither a folder holding config.json and weights nor a Hugging Face repo id "
                         f"such as cerebras/btlm-3b-8k-base")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"{name} is not a local folder, and downloading it from the Hugging Face Hub needs the "
                         f"optional huggingface_hub package: pip install huggingface_hub") from None
    try:
        folder = snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"])
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):  # no safetensors there: pickled weights
            folder = snapshot_download(name, allow_patterns=["config.json", "pytorch_model*.bin", "*.bin.index.json"])
    except Exception as e:  # huggingface_hub's own errors: network, authentication, no such repo
        raise ModelError(f"downloading {name} from the Hugging Face Hub failed ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None
    return folder


def _read_weights(folder):
    """{name: tensor} of the first of model.safetensors, its shards, pytorch_model.bin, its shards found in folder."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        path, index = os.path.join(folder, single), os.path.join(folder, single + ".index.json")
        if os.path.isfile(path):
            files = [path]
        elif os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted({os.path.join(folder, s) for s in json.load(f)["weight_map"].values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelError(f"{index} is not a shard index with a weight_map ({type(e).__name__}: {e})") from None
        else:
            continue
        sd = {}
        for path in files:
            sd.update(_load_safetensors(path) if path.endswith(".safetensors") else _load_bin(path))
        return sd
    raise ModelError(f"{folder} holds neither model.safetensors nor pytorch_model.bin (nor a shard index of either)")


def _load_bin(path):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a missing shard, a truncated zip, a pickle that is not plain tensors
        raise ModelError(f"{path} cannot be read as a PyTorch state dict ({type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise ModelError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def _load_safetensors(path):
    """{name: tensor} on the CPU, viewing a private memory map of the file (safetensors' default "mmap" backend):
    nothing is read until used, or copied unless written to."""
    st = _safetensors("reading a .safetensors checkpoint")
    try:
        return st.torch.load_file(path)
    except (OSError, st.SafetensorError) as e:  # a missing shard, a bad header, a byte range beyond the file
        raise ModelError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]})") from None


def _safetensors(doing):
    """The optional safetensors package (with safetensors.torch) that reads and writes the .safetensors format
    (huggingface/safetensors: an 8-byte header length, a JSON header of dtypes, shapes and byte offsets, raw data)."""
    try:
        import safetensors.torch
    except ImportError:
        raise ModelError(f"{doing} needs the safetensors package: pip install safetensors") from None
    return safetensors
