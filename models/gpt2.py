"""GPT-2 in Hugging Face's layout: `models.gpt.GPT` as `GPT2LMHeadModel` sees it.

The reference `GPT` already is GPT-2's architecture: learned position embeddings,
pre-LayerNorm blocks (epsilon 1e-5), GELU with the tanh approximation, attention
scaled by `1/sqrt(head_dim)`, and with `bias=True, tie_weights=True` the biases and
the tied LM head of the released checkpoints (`GPTConfig.preset("small")` is GPT-2
124M). This module says how its arrays and Hugging Face's tensors correspond, for
`models/hf.py`:

Titanax array <- Hugging Face tensor (names after the `transformer.` prefix):

- `wte` (vocab, embed) <- `wte.weight`; `wpe` (ctx, embed) <- `wpe.weight`.
- `blocks.w_qkv` (layers, embed, heads, 3, head_dim) <- `h.{i}.attn.c_attn.weight`
    (C, 3C): the columns split into (3, heads, head_dim), then heads first.
- `blocks.w_attn_out` (layers, heads, head_dim, embed) <- `h.{i}.attn.c_proj.weight`
    (C, C): the rows split into (heads, head_dim).
- `blocks.w_mlp_in`, `w_mlp_out` <- `h.{i}.mlp.c_fc.weight`, `mlp.c_proj.weight`, as
    they are (GPT-2's Conv1D stores (in, out), as Titanax does).
- LayerNorm scales and biases, the other biases <- `ln_1`, `ln_2`, `ln_f`, `*.bias`,
    split like their weights.
- `lm_head` (embed, vocab), untied only <- `lm_head.weight` (V, C), no prefix,
    transposed.

`c_attn`'s columns are `[q | k | v]`, each heads-major; Titanax keeps the heads
first (`(embed, heads, 3, head_dim)`), so that one 2-D matmul computes q, k and v
and, under tensor parallelism, each device's heads are one contiguous block of its
columns: attention then needs Megatron's minimal communication (one all-reduce after
the attention output in the forward pass, one before QKV in the backward pass).
Loading with a plan reads each device's heads straight from `c_attn`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

import titanax as tx

from .gpt import GPT, GPTConfig

__all__ = ["config_from_hf", "config_to_hf", "missing_tensors", "tensor_views"]

# GELU variants equal to `jax.nn.gelu(approximate=True)`.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """A `GPTConfig` from a Hugging Face GPT-2 `config.json` dict.

    **Arguments:**

    - `hf`: the parsed `config.json` (`model_type: "gpt2"`).

    **Returns:**

    The `GPTConfig` (biases on; tied unless `tie_word_embeddings` is false).

    **Raises:** `tx.CheckpointError` for settings the Titanax GPT does not compute
    (another activation, epsilon, MLP width, or attention scaling).
    """

    def check(ok: bool, field: str, expected: str):
        if not ok:
            raise tx.CheckpointError(
                f"Expected `{field}` {expected} in a GPT-2 config.json, got "
                f"{hf.get(field)!r}.",
                suggestion="The Titanax GPT computes GPT-2 as released; convert the "
                "checkpoint, or load it with its own code.",
                path=f"config.json:{field}",
            )

    n_embd = hf["n_embd"]
    check(hf.get("activation_function", "gelu_new") in _TANH_GELUS,
          "activation_function", f"in {_TANH_GELUS}")  # fmt: skip
    check(hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "layer_norm_epsilon", "1e-5")
    check(hf.get("n_inner") in (None, 4 * n_embd), "n_inner", f"null or {4 * n_embd}")
    check(hf.get("scale_attn_weights", True) is True, "scale_attn_weights", "true")
    check(not hf.get("scale_attn_by_inverse_layer_idx", False),
          "scale_attn_by_inverse_layer_idx", "false")  # fmt: skip
    check(not hf.get("add_cross_attention", False), "add_cross_attention", "false")
    drops = {k: hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) > 1:
        warnings.warn(
            f"GPT-2 config has different dropout rates {drops}; the Titanax GPT has "
            f"one rate and uses resid_pdrop={drops['resid_pdrop']} everywhere.",
            stacklevel=3,
        )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        dropout=drops["resid_pdrop"],
        bias=True,
        tie_weights=hf.get("tie_word_embeddings", True),
    )


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of a `GPTConfig`.

    **Arguments:**

    - `config`: the model's `GPTConfig`.

    **Returns:**

    A dict for `GPT2Config(**d)` / `GPT2LMHeadModel.from_pretrained`.
    """
    eos = 50256 if config.vocab_size > 50256 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


def tensor_views(config: GPTConfig, prefix: str = "transformer.") -> list[Any]:
    """The `models.hf.TensorView` of every array of a `GPT` with this config.

    **Arguments:**

    - `config`: the model's `GPTConfig`.
    - `prefix`: the base model's tensor-name prefix (`"transformer."` for
        `GPT2LMHeadModel`, `""` for a bare `GPT2Model`).

    **Returns:**

    A list of `TensorView`s, one per array of the model.
    """
    from .hf import TensorView

    C, V, T, L = config.n_embd, config.vocab_size, config.block_size, config.n_layer
    nh, hs, m = config.n_head, config.head_dim, config.mlp_size
    h = prefix + "h.{}."

    def one(path, name, *split, perm=None):
        perm = tuple(range(len(split))) if perm is None else perm
        return TensorView(path, name, perm, tuple(split))

    def stacked(path, name, *split, order=None):
        perm = tuple(range(len(split)))
        return TensorView(path, h + name, perm, tuple(split), L, order)

    views = [
        one("wte", prefix + "wte.weight", (V,), (C,)),
        one("wpe", prefix + "wpe.weight", (T,), (C,)),
        stacked("blocks.ln1_scale", "ln_1.weight", (C,)),
        stacked(
            "blocks.w_qkv", "attn.c_attn.weight", (C,), (3, nh, hs), order=(0, 2, 1, 3)
        ),  # fmt: skip
        stacked("blocks.w_attn_out", "attn.c_proj.weight", (nh, hs), (C,)),
        stacked("blocks.ln2_scale", "ln_2.weight", (C,)),
        stacked("blocks.w_mlp_in", "mlp.c_fc.weight", (C,), (m,)),
        stacked("blocks.w_mlp_out", "mlp.c_proj.weight", (m,), (C,)),
        one("lnf_scale", prefix + "ln_f.weight", (C,)),
    ]
    if config.bias:
        views += [
            stacked("blocks.ln1_bias", "ln_1.bias", (C,)),
            stacked("blocks.b_qkv", "attn.c_attn.bias", (3, nh, hs), order=(1, 0, 2)),
            stacked("blocks.b_attn_out", "attn.c_proj.bias", (C,)),
            stacked("blocks.ln2_bias", "ln_2.bias", (C,)),
            stacked("blocks.b_mlp_in", "mlp.c_fc.bias", (m,)),
            stacked("blocks.b_mlp_out", "mlp.c_proj.bias", (C,)),
            one("lnf_bias", prefix + "ln_f.bias", (C,)),
        ]
    if not config.tie_weights:
        views.append(one("lm_head", "lm_head.weight", (C,), (V,), perm=(1, 0)))
    return views


def missing_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Tensors Hugging Face's GPT-2 always has and a bias-free `GPT` lacks: its
    biases, as zeros (a zero bias computes exactly what no bias does).

    **Arguments:**

    - `model`: the `GPT` being saved.

    **Returns:**

    `{name: zeros}`, empty when `model.config.bias` is true.
    """
    config = model.config
    if config.bias:
        return {}
    C, m = config.n_embd, config.mlp_size
    sizes = {
        "ln_1.bias": C,
        "attn.c_attn.bias": 3 * C,
        "attn.c_proj.bias": C,
        "ln_2.bias": C,
        "mlp.c_fc.bias": m,
        "mlp.c_proj.bias": C,
    }
    out = {
        f"transformer.h.{i}.{name}": np.zeros(size, np.float32)
        for i in range(config.n_layer)
        for name, size in sizes.items()
    }
    out["transformer.ln_f.bias"] = np.zeros(C, np.float32)
    return out
