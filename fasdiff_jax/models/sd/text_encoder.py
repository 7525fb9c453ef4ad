"""CLIP text encoder (transformers' ``CLIPTextModel``) in Flax, for one job: the empty prompt.

FaSDiff conditions SD on visual prompts, not text, so the UNet's cross-attention always sees
the embedding of the empty prompt. :func:`null_text_embedding_from_pipeline` computes it once,
at conversion, from the pipeline's own ``text_encoder/`` and ``tokenizer/`` folders (numpy
safetensors reading, no torch, no tokenizer library: the empty prompt is ``[BOS, EOS, PAD...]``),
so training and decoding never need the text encoder. Attribute names follow transformers so
the generic converter maps the checkpoint (``text_model.encoder.layers.3.mlp.fc1.weight``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fasdiff_jax.errors import ConversionError, UnsupportedConfigError
from fasdiff_jax.models import layers

Dtype = Any

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # SD 1.x (OpenAI CLIP)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # SD 2.x (OpenCLIP)
}


class _EncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype)
        h = layers.LayerNorm(self.eps, name="layer_norm1", **kw)(x)
        attn = _SelfAttention(self.hidden_size, self.num_heads, dtype=self.dtype, name="self_attn")
        x = x + attn(h)
        h = layers.LayerNorm(self.eps, name="layer_norm2", **kw)(x)
        return x + _MLP(self.hidden_size, self.intermediate_size, self.hidden_act,
                        dtype=self.dtype, name="mlp")(h)


class _SelfAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        qkv = lambda n: layers.Dense(self.hidden_size, name=n, dtype=self.dtype,  # noqa: E731
                                     axes=layers.QKV_KERNEL_AXES)(x)
        out = layers.attention(qkv("q_proj"), qkv("k_proj"), qkv("v_proj"), self.num_heads,
                               causal=True)
        return layers.Dense(self.hidden_size, name="out_proj", dtype=self.dtype,
                            axes=layers.ATTN_OUT_KERNEL_AXES)(out)


class _MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.Dense(self.intermediate_size, name="fc1", dtype=self.dtype)(x)
        h = _ACTIVATIONS[self.hidden_act](h)
        return layers.Dense(self.hidden_size, name="fc2", dtype=self.dtype,
                            axes=(layers.DENSE_KERNEL_AXES[1], layers.DENSE_KERNEL_AXES[0]))(h)


class _Embeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_positions: int

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        emb = lambda n, size: nn.Embed(  # noqa: E731
            size, self.hidden_size, name=n,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        pos = jnp.arange(ids.shape[1])[None]
        return emb("token_embedding", self.vocab_size)(ids) + emb(
            "position_embedding", self.max_positions)(pos)


class _Encoder(nn.Module):
    num_layers: int
    layer: Mapping[str, Any]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _EncoderLayer(**self.layer, name=f"layers_{i}")(x)
        return x


class _TextTransformer(nn.Module):
    cfg: Mapping[str, Any]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        c = self.cfg
        x = _Embeddings(c["vocab_size"], c["hidden_size"], c["max_position_embeddings"],
                        name="embeddings")(ids)
        layer = dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                     num_heads=c["num_attention_heads"], hidden_act=c["hidden_act"],
                     eps=c["layer_norm_eps"], dtype=self.dtype)
        x = _Encoder(c["num_hidden_layers"], layer, name="encoder")(x)
        return layers.LayerNorm(c["layer_norm_eps"], name="final_layer_norm", dtype=self.dtype)(x)


class CLIPTextModel(nn.Module):
    """``apply({'params': p}, input_ids)`` -> last hidden state (B, L, hidden), as SD uses it."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> "CLIPTextModel":
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise UnsupportedConfigError(
                f"text encoder hidden_act={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings", "layer_norm_eps")
        kwargs = {f: cfg[f] for f in fields if f in cfg}
        return cls(hidden_act=act, **kwargs, **overrides)

    @staticmethod
    def canonical_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """transformers >= 5 saves keys without the ``text_model.`` prefix SD checkpoints have."""
        return {k if k.startswith("text_model.") else f"text_model.{k}": v
                for k, v in state.items()}

    def dummy_inputs(self) -> tuple[jax.Array]:
        return (jnp.zeros((1, self.max_position_embeddings), jnp.int32),)

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = {f: getattr(self, f) for f in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps")}
        return _TextTransformer(cfg, dtype=self.dtype, name="text_model")(input_ids)


def _token(value: Any) -> str | None:
    """A special token as written in tokenizer JSON files: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def empty_prompt_ids(tokenizer_dir: str) -> np.ndarray:
    """Token ids the pipeline's CLIP tokenizer gives ``""`` padded to max length: [BOS, EOS, PAD...].

    Read from ``vocab.json`` and the special-token files, so SD 1.x (pad = ``<|endoftext|>``)
    and SD 2.x (pad = ``!``) both come out right without a tokenizer library.
    """
    def read(name: str) -> dict:
        path = os.path.join(tokenizer_dir, name)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: unreadable: {e}") from e

    vocab = read("vocab.json")
    if not vocab:
        raise ConversionError(f"{tokenizer_dir}: no vocab.json (a CLIP tokenizer folder is needed "
                              f"to compute the empty-prompt embedding)")
    special = {**read("tokenizer_config.json"), **read("special_tokens_map.json")}
    bos = _token(special.get("bos_token")) or "<|startoftext|>"
    eos = _token(special.get("eos_token")) or "<|endoftext|>"
    pad = _token(special.get("pad_token")) or eos
    length = int(read("tokenizer_config.json").get("model_max_length", 77))
    if length > 10_000:  # transformers' "no limit" sentinel
        length = 77
    missing = [t for t in (bos, eos, pad) if t not in vocab]
    if missing:
        raise ConversionError(f"{tokenizer_dir}/vocab.json lacks special tokens {missing}")
    return np.array([vocab[bos], vocab[eos]] + [vocab[pad]] * (length - 2), np.int32)


def null_text_embedding_from_pipeline(pipeline_dir: str,
                                      variant: str | None = None) -> np.ndarray:
    """The empty-prompt embedding (1, L, hidden) of a diffusers SD pipeline folder
    (``variant``: its ``*.fp16.safetensors``-style weights, see ``convert.read_weights``)."""
    from fasdiff_jax.convert import load_diffusers  # late: convert imports this module lazily

    module, params = load_diffusers(os.path.join(pipeline_dir, "text_encoder"), variant)
    if not isinstance(module, CLIPTextModel):
        raise UnsupportedConfigError(
            f"{pipeline_dir}/text_encoder is a {type(module).__name__}, not a CLIPTextModel")
    ids = empty_prompt_ids(os.path.join(pipeline_dir, "tokenizer"))
    if len(ids) > module.max_position_embeddings:
        raise ConversionError(f"tokenizer length {len(ids)} exceeds the text encoder's "
                              f"{module.max_position_embeddings} positions")
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids)[None])
    return np.asarray(out, np.float32)
