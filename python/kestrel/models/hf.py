"""Hugging Face checkpoints as KestrelLMs and back (docs/models_and_decoding.md, "Converted checkpoints").

`from_hf(model_or_path, dtype=None)`: a `transformers` LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
(biases on q/k/v) or Qwen3ForCausalLM (per-head q/k RMSNorm), given as a model object or a local directory (its
config.json and safetensors weights; nothing is downloaded), as a KestrelLM with softmax attention: the config
mapped (GQA, head_dim, rope_theta, Llama-3 rope scaling, rms_norm_eps, tied or untied embeddings) and the weights
copied (q/k/v and gate/up fused into one product each). `to_hf(model)` builds the transformers model back, bit for
bit. transformers is an optional dependency (`pip install kestrel[hf]`), imported only here.

What kestrel does not model is refused, naming it: other architectures, sliding-window attention that can matter
(a window shorter than max_position_embeddings), rope types other than default and llama3, an activation other
than SiLU, biases on o_proj or the MLP.
"""

import os

import torch

from .config import KestrelConfig
from .lm import KestrelLM

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _transformers():
    try:
        import transformers  # an optional dependency (the hf extra), imported only when converting
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("kestrel.models.hf needs transformers: pip install 'kestrel[hf]'") from error
    return transformers


def _rope(cfg):
    """(rope_theta, rope_scaling or None) from a transformers config (4.x: rope_theta / rope_scaling; 5.x:
    rope_parameters)."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
        scaling = dict(params)
    else:
        theta = getattr(cfg, "rope_theta", None)
        scaling = dict(cfg.rope_scaling) if getattr(cfg, "rope_scaling", None) else None
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        scaling = None
    elif kind == "llama3":
        scaling = {
            key: scaling[key]
            for key in (
                "rope_type",
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            )
        }
    else:
        raise ValueError(f"from_hf: rope type {kind!r} is not supported (supported: default, llama3)")
    return float(theta if theta is not None else 10000.0), scaling


def config_from_hf(cfg, architecture, num_draft_heads=0):
    """The KestrelConfig of a transformers config of one of the SUPPORTED architectures (with num_draft_heads
    Medusa heads, zero-initialised: train them with kestrel.models.training, the base frozen)."""
    if architecture not in SUPPORTED:
        raise ValueError(f"from_hf: {architecture} is not supported; supported: {', '.join(SUPPORTED)}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"from_hf: hidden_act {cfg.hidden_act!r} is not supported (SwiGLU with SiLU only)")
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("from_hf: mlp_bias=True is not supported")
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    if uses_window and window is not None and window < cfg.max_position_embeddings:
        raise ValueError(
            f"from_hf: sliding-window attention (window {window} < max_position_embeddings "
            f"{cfg.max_position_embeddings}) is not supported"
        )
    qkv_bias = architecture == "Qwen2ForCausalLM" or bool(getattr(cfg, "attention_bias", False))
    if getattr(cfg, "attention_bias", False) and architecture != "Qwen2ForCausalLM":
        raise ValueError(f"from_hf: attention_bias=True (a bias on o_proj too) is not supported for {architecture}")
    theta, scaling = _rope(cfg)
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return KestrelConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_ff=cfg.intermediate_size,
        max_seq_len=cfg.max_position_embeddings,
        rope_base=theta,
        rope_scaling=scaling,
        norm_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        attn_bias=qkv_bias,
        qk_norm=architecture == "Qwen3ForCausalLM",
        norm_in_float32=True,
        num_draft_heads=num_draft_heads,
        hf_architecture=architecture,
    )


def load_hf_model(model_or_path, dtype=None):
    """The transformers model of a local checkpoint directory (config.json and safetensors weights, in dtype or
    the checkpoint's own), or a given transformers model as it is."""
    transformers = _transformers()
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"from_hf: {path!r} is not a local checkpoint directory (no config.json)")
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        architecture = (getattr(cfg, "architectures", None) or [type(cfg).__name__])[0]
        if architecture not in SUPPORTED:
            raise ValueError(f"from_hf: {architecture} is not supported; supported: {', '.join(SUPPORTED)}")
        model = getattr(transformers, architecture).from_pretrained(
            path, local_files_only=True, torch_dtype=dtype or "auto"
        )
        return model
    if not isinstance(model_or_path, torch.nn.Module) or not hasattr(model_or_path, "config"):
        raise TypeError(
            f"from_hf: expected a transformers model or a local directory, got {type(model_or_path).__name__}"
        )
    return model_or_path


def from_hf(model_or_path, dtype=None, num_draft_heads=0):
    """A KestrelLM holding the weights of a transformers causal LM (see the module docstring), with
    num_draft_heads untrained (zero-initialised) draft heads for tree speculative decoding."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"from_hf: dtype must be None (the checkpoint's) or a torch floating dtype, got {dtype!r}")
    hf = load_hf_model(model_or_path, dtype)
    architecture = type(hf).__name__
    config = config_from_hf(hf.config, architecture, num_draft_heads)
    source = hf.state_dict()
    target_dtype = dtype or next(hf.parameters()).dtype
    model = KestrelLM(config).to(target_dtype)
    state = {"embed.weight": source["model.embed_tokens.weight"], "norm.weight": source["model.norm.weight"]}
    state["lm_head.weight"] = source.get("lm_head.weight", source["model.embed_tokens.weight"])
    for i in range(config.n_layers):
        hf_layer, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf_layer + "self_attn."
        state[ours + "attn_norm.weight"] = source[hf_layer + "input_layernorm.weight"]
        state[ours + "mlp_norm.weight"] = source[hf_layer + "post_attention_layernorm.weight"]
        state[ours + "attn.qkv_proj.weight"] = torch.cat([source[attn + f"{n}_proj.weight"] for n in "qkv"])
        if config.attn_bias:
            state[ours + "attn.qkv_proj.bias"] = torch.cat([source[attn + f"{n}_proj.bias"] for n in "qkv"])
        state[ours + "attn.o_proj.weight"] = source[attn + "o_proj.weight"]
        if config.qk_norm:
            state[ours + "attn.q_norm.weight"] = source[attn + "q_norm.weight"]
            state[ours + "attn.k_norm.weight"] = source[attn + "k_norm.weight"]
        mlp = hf_layer + "mlp."
        state[ours + "mlp.gate_up_proj.weight"] = torch.cat(
            [source[mlp + "gate_proj.weight"], source[mlp + "up_proj.weight"]]
        )
        state[ours + "mlp.down_proj.weight"] = source[mlp + "down_proj.weight"]
    missing, unexpected = model.load_state_dict({k: v.to(target_dtype) for k, v in state.items()}, strict=False)
    missing = [
        k for k in missing if not (config.tie_embeddings and k == "lm_head.weight") and not k.startswith("draft_heads.")
    ]
    if missing or unexpected:  # pragma: no cover - a mapping error, not a user error
        raise RuntimeError(f"from_hf: the mapping left {missing} unset and {unexpected} unknown")
    return model.to(next(hf.parameters()).device)


def config_to_hf(config):
    """The transformers config of a converted KestrelConfig (its hf_architecture)."""
    transformers = _transformers()
    architecture = config.hf_architecture
    if architecture not in SUPPORTED:
        raise ValueError(
            f"to_hf: this KestrelLM was not converted from a supported checkpoint (hf_architecture={architecture!r}); "
            f"supported: {', '.join(SUPPORTED)}"
        )
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling is not None:
        rope = dict(config.rope_scaling, rope_theta=config.rope_base)
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
    )
    if "rope_parameters" in config_class().to_dict():  # transformers 5
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = config.rope_base
        kwargs["rope_scaling"] = None if config.rope_scaling is None else dict(config.rope_scaling)
    if architecture in ("MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        kwargs["sliding_window"] = None
    return getattr(transformers, architecture), config_class(**kwargs)


def to_hf(model):
    """The transformers model of a converted KestrelLM, its weights copied back (bit for bit)."""
    model_class, hf_config = config_to_hf(model.config)
    config = model.config
    hf = model_class(hf_config).to(dtype=model.dtype, device=model.device)
    source = model.state_dict()
    H, Hkv, D = config.n_heads, config.n_kv_heads, config.head_dim
    state = {"model.embed_tokens.weight": source["embed.weight"], "model.norm.weight": source["norm.weight"]}
    # (draft heads, if any, are kestrel's own: transformers' model has no place for them)
    if not config.tie_embeddings:
        state["lm_head.weight"] = source["lm_head.weight"]
    for i in range(config.n_layers):
        hf_layer, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf_layer + "self_attn."
        state[hf_layer + "input_layernorm.weight"] = source[ours + "attn_norm.weight"]
        state[hf_layer + "post_attention_layernorm.weight"] = source[ours + "mlp_norm.weight"]
        for name, part in zip("qkv", source[ours + "attn.qkv_proj.weight"].split([H * D, Hkv * D, Hkv * D])):
            state[attn + f"{name}_proj.weight"] = part
        if config.attn_bias:
            for name, part in zip("qkv", source[ours + "attn.qkv_proj.bias"].split([H * D, Hkv * D, Hkv * D])):
                state[attn + f"{name}_proj.bias"] = part
        state[attn + "o_proj.weight"] = source[ours + "attn.o_proj.weight"]
        if config.qk_norm:
            state[attn + "q_norm.weight"] = source[ours + "attn.q_norm.weight"]
            state[attn + "k_norm.weight"] = source[ours + "attn.k_norm.weight"]
        gate, up = source[ours + "mlp.gate_up_proj.weight"].chunk(2)
        state[hf_layer + "mlp.gate_proj.weight"] = gate
        state[hf_layer + "mlp.up_proj.weight"] = up
        state[hf_layer + "mlp.down_proj.weight"] = source[ours + "mlp.down_proj.weight"]
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # pragma: no cover - a mapping error
        raise RuntimeError(f"to_hf: the mapping left {missing} unset and {unexpected} unknown")
    return hf


__all__ = ["SUPPORTED", "config_from_hf", "config_to_hf", "from_hf", "load_hf_model", "to_hf"]
