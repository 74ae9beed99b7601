"""A Llama-style decoder written like `models/gpt.py`: a logical axis on every weight.

Read top to bottom: config, rotary embeddings, `LlamaBlock`, `Llama`, loss.

The architecture of Llama 2 and 3 (and of the many models that copy it): RMSNorm
before each sublayer, rotary position embeddings (RoPE, Hugging Face's "rotate half"
convention, with Llama 3's frequency scaling), a SwiGLU MLP, grouped-query attention
(`n_kv_head` key/value heads shared by groups of `n_head / n_kv_head` query heads), no
biases by default, and an untied LM head. `models/hf.py` loads and saves Hugging Face
`LlamaForCausalLM` checkpoints into it exactly.

Every weight names its logical axes: `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`vocab` (and `layers` for the stacked blocks); `models/llama_plans.py` maps them onto
mesh axes. Under Megatron tensor parallelism (`heads`, `kv_heads` and `mlp` on one mesh
axis) q, k, v and the gate/up projections are column-parallel, the attention output
and down projections row-parallel; `n_kv_head` must then be a multiple of the axis
size. The model file never mentions a mesh: context and sequence parallelism reach it
through an activation layout given from outside (`LlamaConfig.layout`, as in
`models/gpt.py`), which it calls with the activations' logical axes.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .gpt import (
    ATTN_OUT_AXES,
    HEAD_AXES,
    MLP_AXES,
    REMAT_POLICIES,
    RESIDUAL_AXES,
    TOKEN_AXES,
    attention,
    check_layout,
    is_sequence_parallel,
    loss_from_logits,
    resolve_unroll,
    run_layers,
    token_shape,
)

__all__ = [
    "Llama",
    "LlamaBlock",
    "LlamaConfig",
    "config_from_hf",
    "config_to_hf",
    "llama_loss",
    "rope_frequencies",
    "tensor_views",
]

# ----------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a `Llama`. Frozen, so it can be a static field of a module.

    The names follow `models/gpt.py`; Hugging Face's `LlamaConfig` names are given in
    brackets (`models/hf.py` converts between them). Parameters are float32.
    """

    # Number of token ids [vocab_size].
    vocab_size: int = 256
    # Longest sequence the rotary tables cover [max_position_embeddings].
    block_size: int = 128
    # Number of decoder blocks [num_hidden_layers].
    n_layer: int = 4
    # Query heads [num_attention_heads].
    n_head: int = 4
    # Key/value heads; must divide `n_head` (grouped-query attention)
    # [num_key_value_heads].
    n_kv_head: int = 2
    # Width of the residual stream [hidden_size].
    n_embd: int = 128
    # Hidden width of the SwiGLU MLP [intermediate_size].
    mlp_size: int = 344
    # Size of one head; `None` means `n_embd // n_head` [head_dim].
    head_size: int | None = None
    # RMSNorm epsilon [rms_norm_eps].
    norm_eps: float = 1e-6
    # RoPE base [rope_theta].
    rope_theta: float = 10000.0
    # Llama 3's RoPE frequency scaling as sorted `(name, value)` pairs of `factor`,
    # `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings`,
    # or `None` for plain RoPE [rope_scaling with rope_type "llama3"].
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    # Share the token embedding with the LM head [tie_word_embeddings].
    tie_weights: bool = False
    # Biases on q, k, v and the attention output [attention_bias].
    attention_bias: bool = False
    # Biases on the three MLP projections [mlp_bias].
    mlp_bias: bool = False
    # How the stacked blocks are looped over: see `GPTConfig.unroll` (`None`:
    # unrolled up to `UNROLL_MAX_LAYERS` layers, scanned beyond).
    unroll: bool | int | None = None
    # Rematerialisation of each block in the backward pass: see `GPTConfig.remat`.
    remat: str = "none"
    # `jax.nn.dot_product_attention`'s `implementation`: `None` (XLA picks), `"xla"`
    # or `"cudnn"` (GPU, bf16/fp16 only). Under context parallelism the layout's
    # ring attention runs instead.
    attention: str | None = None
    # Where the activations live: `None`, or an activation layout from outside
    # (`tx.Activations(plan, mesh)`); see `GPTConfig.layout`.
    layout: Any = None

    def __post_init__(self):
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"`n_kv_head` must divide `n_head`, got n_head={self.n_head} and "
                f"n_kv_head={self.n_kv_head}."
            )
        if self.head_size is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"`n_head` must divide `n_embd` when `head_size` is None, got "
                f"n_embd={self.n_embd} and n_head={self.n_head}."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head size, got {self.head_dim}.")
        if self.attention not in (None, "xla", "cudnn"):
            raise ValueError(
                f"`attention` must be None, 'xla' or 'cudnn', got {self.attention!r}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"`remat` must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}."
            )
        check_layout(self.layout)
        if self.rope_scaling is not None:
            keys = {k for k, _ in self.rope_scaling}
            need = {
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            }
            if keys != need:
                raise ValueError(
                    f"`rope_scaling` must name exactly {sorted(need)}, got "
                    f"{sorted(keys)}."
                )

    @property
    def head_dim(self) -> int:
        """Size of one attention head: `head_size`, or `n_embd // n_head`."""
        return (
            self.head_size if self.head_size is not None else self.n_embd // self.n_head
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named preset from `PRESETS` with some fields replaced.

        **Arguments:**

        - `name`: `"tiny"` (tests), `"baby"` (trains on a CPU) or `"llama3-8b"`
            (the shapes of Llama 3 8B, for planning and benchmarks).
        - `**overrides`: fields to replace.

        **Returns:**

        A `LlamaConfig`.
        """
        if name not in PRESETS:
            raise ValueError(
                f"Unknown Llama preset {name!r}; choose one of {sorted(PRESETS)}."
            )
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
        mlp_size=64,
    ),
    "baby": LlamaConfig(),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, block_size=8192, n_layer=32, n_head=32, n_kv_head=8,
        n_embd=4096, mlp_size=14336, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=(
            ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192.0),
        ),
    ),
}  # fmt: skip

# ----------------------------------------------------------------------------
# Rotary position embeddings


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE's inverse frequencies, `(head_dim // 2,)` float32, as Hugging Face
    computes them (`"default"` and `"llama3"` rope types).

    **Arguments:**

    - `config`: the model's `LlamaConfig`.

    **Returns:**

    A numpy float32 array: a constant of the compiled program.
    """
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_scaling is None:
        return inv_freq
    s = dict(config.rope_scaling)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the
    # band between them interpolated smoothly.
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _apply_rope(
    x: Float[Array, "B T N D"], cos: Float[Array, "T D"], sin: Float[Array, "T D"]
) -> Float[Array, "B T N D"]:
    # "Rotate half": dims i and i + D/2 form a pair (Hugging Face's convention).
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D)
    return (x * cos + rotated * sin).astype(x.dtype)


def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
    # In float32 like Hugging Face's LlamaRMSNorm, scaled after casting back.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def _constrain(
    config: "LlamaConfig", x: Array, *, sequence_parallel: bool = True
) -> Array:
    """The residual stream `(B, T, C)`, split as the config's layout says (see
    `models.gpt`'s `_constrain`)."""
    if config.layout is None:
        return x
    return config.layout.constrain(
        x, RESIDUAL_AXES, sequence_parallel=sequence_parallel
    )


# ----------------------------------------------------------------------------
# One decoder block


class LlamaBlock(eqx.Module):
    """One pre-RMSNorm Llama block: grouped-query attention with RoPE, then SwiGLU.

    In a `Llama` the blocks are stacked: every array gains a leading `layers` dim.

    **Arguments:**

    - `config`: the model's `LlamaConfig`.
    - `key`: a PRNG key for the initial weights.
    """

    attn_norm: Float[Array, "embed"]
    # Column-parallel over (kv_)heads: the 2-D matmul's output dim is (heads,
    # head_dim) flattened, heads major, so a sharded `heads` stays contiguous.
    wq: Float[Array, "embed heads head_dim"]
    wk: Float[Array, "embed kv_heads head_dim"]
    wv: Float[Array, "embed kv_heads head_dim"]
    bq: Float[Array, "heads head_dim"] | None
    bk: Float[Array, "kv_heads head_dim"] | None
    bv: Float[Array, "kv_heads head_dim"] | None
    # Row-parallel: a sum over heads, one all-reduce when heads are sharded.
    wo: Float[Array, "heads head_dim embed"]
    bo: Float[Array, "embed"] | None
    mlp_norm: Float[Array, "embed"]
    w_gate: Float[Array, "embed mlp"]
    w_up: Float[Array, "embed mlp"]
    w_down: Float[Array, "mlp embed"]
    b_gate: Float[Array, "mlp"] | None
    b_up: Float[Array, "mlp"] | None
    b_down: Float[Array, "embed"] | None
    config: LlamaConfig = eqx.field(static=True)

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        c, nh, nkv, d, m = (
            config.n_embd,
            config.n_head,
            config.n_kv_head,
            config.head_dim,
            config.mlp_size,
        )
        keys = jax.random.split(key, 7)
        std = 0.02  # Hugging Face's initializer_range

        def bias(flag, *shape):
            return jnp.zeros(shape, jnp.float32) if flag else None

        self.attn_norm = jnp.ones((c,), jnp.float32)
        self.wq = _normal(keys[0], (c, nh, d), std)
        self.wk = _normal(keys[1], (c, nkv, d), std)
        self.wv = _normal(keys[2], (c, nkv, d), std)
        self.bq = bias(config.attention_bias, nh, d)
        self.bk = bias(config.attention_bias, nkv, d)
        self.bv = bias(config.attention_bias, nkv, d)
        self.wo = _normal(keys[3], (nh, d, c), std)
        self.bo = bias(config.attention_bias, c)
        self.mlp_norm = jnp.ones((c,), jnp.float32)
        self.w_gate = _normal(keys[4], (c, m), std)
        self.w_up = _normal(keys[5], (c, m), std)
        self.w_down = _normal(keys[6], (m, c), std)
        self.b_gate = bias(config.mlp_bias, m)
        self.b_up = bias(config.mlp_bias, m)
        self.b_down = bias(config.mlp_bias, c)
        self.config = config

    def attention(
        self, x: Float[Array, "B T C"], cos: Array, sin: Array
    ) -> Float[Array, "B T C"]:
        """Causal grouped-query self-attention with RoPE, without norm or residual."""
        B, T, C = x.shape
        nh, nkv, d = self.config.n_head, self.config.n_kv_head, self.config.head_dim
        # (B*T, C): 2-D matmuls are faster on XLA:CPU (`token_shape`).
        lead = token_shape(self.config, B, T)
        x = x.reshape(*lead, C)

        def project(w, b, n):
            y = x @ w.reshape(C, n * d)  # (B*T, n*d), heads major
            if b is not None:
                y = y + b.reshape(n * d)
            return y.reshape(B, T, n, d)  # (B, T, n, d)

        layout = self.config.layout
        sp = is_sequence_parallel(self.config)
        if sp:
            # x: (B, T, C) split on `seq` over TP's axis: the layout gathers it
            # once for the three projections (and reduce-scatters its gradient).
            ws, bs = (self.wq, self.wk, self.wv), (self.bq, self.bk, self.bv)
            ys = layout.project_in(
                x,
                [w.reshape(C, -1) for w in ws],  # (C, n*d), heads major
                w_names=[("embed", "heads")] + [("embed", "kv_heads")] * 2,
            )  # (B, T, n*d) each
            q, k, v = (
                (y if b is None else y + b.reshape(-1)).reshape(B, T, -1, d)
                for y, b in zip(ys, bs, strict=True)
            )  # (B, T, n, d)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        else:
            q = _apply_rope(project(self.wq, self.bq, nh), cos, sin)
            k = _apply_rope(project(self.wk, self.bk, nkv), cos, sin)
            v = project(self.wv, self.bv, nkv)
        if layout is not None and layout.context_parallel:
            # The sequence is split: ring attention over the context axis.
            kv_axes = ("batch", "seq", "kv_heads", "head_dim")
            y = layout.attention(q, k, v, names=HEAD_AXES, kv_names=kv_axes)
        else:
            y = attention(q, k, v, implementation=self.config.attention)
        # y: (B, T, nh, d)
        if sp:  # reduce-scattered onto the residual stream's sequence shards
            y = layout.project_out(y, self.wo, names=HEAD_AXES, w_names=ATTN_OUT_AXES)
        else:
            y = y.reshape(*lead, nh * d) @ self.wo.reshape(nh * d, C)  # (B*T, C)
        if self.bo is not None:
            y = y + self.bo
        return y.reshape(B, T, C)

    def mlp(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        """SwiGLU: `down(silu(gate(x)) * up(x))`, without norm or residual."""
        B, T, C = x.shape
        x = x.reshape(*token_shape(self.config, B, T), C)  # (B*T, C)
        sp = is_sequence_parallel(self.config)
        if sp:  # as in `attention`: the sequence gathered, then reduce-scattered
            gate, up = self.config.layout.project_in(
                x, [self.w_gate, self.w_up], w_names=[("embed", "mlp")] * 2
            )  # (B, T, M) each
        else:
            gate, up = x @ self.w_gate, x @ self.w_up  # (B*T, M) each
        if self.b_gate is not None and self.b_up is not None:
            gate, up = gate + self.b_gate, up + self.b_up
        if sp:
            y = self.config.layout.project_out(
                jax.nn.silu(gate) * up,
                self.w_down,
                names=MLP_AXES,
                w_names=("mlp", "embed"),
            )  # (B, T, C)
        else:
            y = (jax.nn.silu(gate) * up) @ self.w_down  # (B*T, C)
        if self.b_down is not None:
            y = y + self.b_down
        return y.reshape(B, T, C)

    def __call__(
        self, x: Float[Array, "B T C"], cos: Array, sin: Array
    ) -> Float[Array, "B T C"]:
        """Run one (unstacked) block on hidden states `(B, T, C)`.

        **Arguments:**

        - `x`: hidden states.
        - `cos`, `sin`: the rotary tables for positions `0..T-1`, `(T, head_dim)`.

        **Returns:**

        Hidden states of the same shape and dtype.
        """
        eps, config = self.config.norm_eps, self.config
        # Block boundaries and sublayer inputs, as in `models.gpt.Block`: under
        # sequence parallelism the inputs stay split, and the sublayers gather.
        sp = is_sequence_parallel(config)
        h = _constrain(config, _rms_norm(x, self.attn_norm, eps), sequence_parallel=sp)
        x = _constrain(config, x + self.attention(h, cos, sin))
        h = _constrain(config, _rms_norm(x, self.mlp_norm, eps), sequence_parallel=sp)
        return _constrain(config, x + self.mlp(h))


# ----------------------------------------------------------------------------
# The model


class Llama(eqx.Module):
    """A Llama-style decoder-only transformer.

    `llama(tokens)` maps int tokens `(B, T)` to logits `(B, T, vocab_size)`, like
    `models.gpt.GPT`.

    **Arguments:**

    - `config`: a `LlamaConfig`.
    - `key`: a PRNG key for the initial weights.

    !!! Example

        ```python
        model = Llama(LlamaConfig.preset("tiny"), key=jax.random.key(0))
        logits = model(jnp.zeros((2, 16), jnp.int32))  # (2, 16, 64)
        ```
    """

    embed: Float[Array, "vocab embed"]
    blocks: LlamaBlock
    norm: Float[Array, "embed"]
    # None when tied: the head then reuses `embed`.
    lm_head: Float[Array, "embed vocab"] | None
    config: LlamaConfig = eqx.field(static=True)

    def __init__(self, config: LlamaConfig, *, key: PRNGKeyArray):
        k_embed, k_blocks, k_head = jax.random.split(key, 3)
        c, v = config.n_embd, config.vocab_size
        self.embed = _normal(k_embed, (v, c), 0.02)
        layer_keys = jax.random.split(k_blocks, config.n_layer)
        self.blocks = eqx.filter_vmap(lambda k: LlamaBlock(config, key=k))(layer_keys)
        self.norm = jnp.ones((c,), jnp.float32)
        self.lm_head = None if config.tie_weights else _normal(k_head, (c, v), 0.02)
        self.config = config

    def rope_tables(
        self, T: int, positions: np.ndarray | None = None
    ) -> tuple[Array, Array]:
        """`cos` and `sin` for positions `0..T-1` (or the given int `positions`,
        `(T,)`), `(T, head_dim)` float32."""
        inv_freq = rope_frequencies(self.config)  # (D/2,)
        pos = np.arange(T) if positions is None else np.asarray(positions)
        freqs = pos.astype(np.float32)[:, None] * inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)  # (T, D)
        return jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))

    def __call__(
        self, tokens: Int[Array, "B T"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B T V"]:
        """Logits for every position.

        **Arguments:**

        - `tokens`: int token ids `(batch, time)`, `time <= block_size`.
        - `key`: unused (Llama has no dropout); accepted for the Titanax loss
            signature.

        **Returns:**

        Logits `(batch, time, vocab_size)`.
        """
        del key
        B, T = tokens.shape
        assert T <= self.config.block_size, (
            f"Cannot forward sequence of length {T}, "
            f"block size is only {self.config.block_size}"
        )
        layout = self.config.layout
        if layout is None:
            cos, sin = self.rope_tables(T)
            h = self.embed[tokens]  # (B, T, C)
        else:
            # The model computes in the layout's order (zigzag under context
            # parallelism): tokens and rotary positions alike.
            cos, sin = self.rope_tables(T, layout.positions(T))
            h = self.embed[layout.to_compute_order(tokens, TOKEN_AXES)]  # (B, T, C)
            h = layout.constrain(h, RESIDUAL_AXES)
        h = run_layers(
            lambda block, h, _key: block(h, cos, sin),
            self.blocks,
            h,
            None,
            unroll=resolve_unroll(self.config.unroll, self.config.n_layer),
            remat=self.config.remat,
        )
        if layout is not None:  # back to the data's order
            h = layout.to_natural_order(h, RESIDUAL_AXES)
        h = _rms_norm(h, self.norm, self.config.norm_eps)
        h = _constrain(self.config, h, sequence_parallel=False)
        h = h.reshape(*token_shape(self.config, B, T), -1)  # (B*T, C)
        if self.lm_head is None:
            logits = jnp.einsum("...c,vc->...v", h, self.embed)  # (B*T, V)
        else:
            logits = h @ self.lm_head  # (B*T, V)
        return logits.reshape(B, T, -1)  # (B, T, V)


def llama_loss(
    model: Llama, batch: dict[str, Array], key: PRNGKeyArray | None = None
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Next-token loss of a `Llama` on `{"x": (B, T), "y": (B, T)}`: `gpt_loss`'s
    signature and metrics (mean cross-entropy, accuracy; labels < 0 ignored)."""
    return loss_from_logits(model(batch["x"], key=key), batch["y"])


# ----------------------------------------------------------------------------
# Hugging Face layout (used by `models/hf.py`)
#
# Titanax array <- Hugging Face tensor (names after the `model.` prefix):
# - `embed` (vocab, embed) <- `embed_tokens.weight`, as is.
# - `blocks.wq` (layers, embed, heads, head_dim) <- `layers.{i}.self_attn.q_proj.weight`
#   (H*D, C): transposed, its rows split per head; `wk`, `wv` likewise (kv_heads).
# - `blocks.wo` (layers, heads, head_dim, embed) <- `o_proj.weight` (C, H*D).
# - `blocks.w_gate`, `w_up`, `w_down` <- `mlp.gate_proj`, `up_proj`, `down_proj`,
#   transposed (PyTorch's Linear stores (out, in)).
# - `blocks.attn_norm`, `mlp_norm`, `norm` <- `input_layernorm`,
#   `post_attention_layernorm`, `norm`.
# - `lm_head` (embed, vocab), untied only <- `lm_head.weight` (V, C), no prefix.

_ROPE_KEYS = (
    "factor",
    "high_freq_factor",
    "low_freq_factor",
    "original_max_position_embeddings",
)


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, Any]:
    """`(rope_theta, rope_scaling)` from either config style: transformers 5's
    `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        import titanax as tx

        raise tx.CheckpointError(
            f"Expected RoPE type 'default' or 'llama3', got {rope_type!r}.",
            suggestion="Other RoPE scalings (linear, dynamic, yarn, ...) are not "
            "implemented in models/llama.py.",
            path="config.json:rope_scaling",
        )
    return float(theta), tuple((k, float(scaling[k])) for k in _ROPE_KEYS)


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """A `LlamaConfig` from a Hugging Face Llama `config.json` dict.

    **Arguments:**

    - `hf`: the parsed `config.json` (`model_type: "llama"`).

    **Returns:**

    The `LlamaConfig`.

    **Raises:** `tx.CheckpointError` for an activation other than SiLU or an
    unsupported RoPE type.
    """
    import titanax as tx

    if hf.get("hidden_act", "silu") != "silu":
        raise tx.CheckpointError(
            f"Expected `hidden_act` 'silu' in a Llama config.json, got "
            f"{hf.get('hidden_act')!r}.",
            suggestion="The Titanax Llama computes SwiGLU; convert the checkpoint.",
            path="config.json:hidden_act",
        )
    theta, scaling = _rope_from_hf(hf)
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"],
        mlp_size=hf["intermediate_size"],
        head_size=head_dim,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_weights=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
    )


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of a `LlamaConfig` (RoPE written as
    `rope_theta` and `rope_scaling`, which transformers 4 and 5 both read).

    **Arguments:**

    - `config`: the model's `LlamaConfig`.

    **Returns:**

    A dict for `LlamaConfig(**d)` / `LlamaForCausalLM.from_pretrained`.
    """
    scaling = None
    if config.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **dict(config.rope_scaling)}
        key = "original_max_position_embeddings"
        scaling[key] = int(scaling[key])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.block_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_size,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_weights,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def tensor_views(config: LlamaConfig, prefix: str = "model.") -> list[Any]:
    """The `models.hf.TensorView` of every array of a `Llama` with this config.

    **Arguments:**

    - `config`: the model's `LlamaConfig`.
    - `prefix`: `"model."` for `LlamaForCausalLM`, `""` for a bare `LlamaModel`.

    **Returns:**

    A list of `TensorView`s, one per array of the model.
    """
    from .hf import TensorView

    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    nh, nkv, d, m = config.n_head, config.n_kv_head, config.head_dim, config.mlp_size
    layer = prefix + "layers.{}."

    def stacked(path, name, *split, perm=None):
        perm = tuple(range(len(split))) if perm is None else perm
        return TensorView(path, layer + name, perm, tuple(split), L)

    views = [
        TensorView("embed", prefix + "embed_tokens.weight", (0, 1), ((V,), (C,))),
        stacked("blocks.attn_norm", "input_layernorm.weight", (C,)),
        stacked("blocks.wq", "self_attn.q_proj.weight", (C,), (nh, d), perm=(1, 0)),
        stacked("blocks.wk", "self_attn.k_proj.weight", (C,), (nkv, d), perm=(1, 0)),
        stacked("blocks.wv", "self_attn.v_proj.weight", (C,), (nkv, d), perm=(1, 0)),
        stacked("blocks.wo", "self_attn.o_proj.weight", (nh, d), (C,), perm=(1, 0)),
        stacked("blocks.mlp_norm", "post_attention_layernorm.weight", (C,)),
        stacked("blocks.w_gate", "mlp.gate_proj.weight", (C,), (m,), perm=(1, 0)),
        stacked("blocks.w_up", "mlp.up_proj.weight", (C,), (m,), perm=(1, 0)),
        stacked("blocks.w_down", "mlp.down_proj.weight", (m,), (C,), perm=(1, 0)),
        TensorView("norm", prefix + "norm.weight", (0,), ((C,),)),
    ]
    if config.attention_bias:
        views += [
            stacked("blocks.bq", "self_attn.q_proj.bias", (nh, d)),
            stacked("blocks.bk", "self_attn.k_proj.bias", (nkv, d)),
            stacked("blocks.bv", "self_attn.v_proj.bias", (nkv, d)),
            stacked("blocks.bo", "self_attn.o_proj.bias", (C,)),
        ]
    if config.mlp_bias:
        views += [
            stacked("blocks.b_gate", "mlp.gate_proj.bias", (m,)),
            stacked("blocks.b_up", "mlp.up_proj.bias", (m,)),
            stacked("blocks.b_down", "mlp.down_proj.bias", (C,)),
        ]
    if not config.tie_weights:
        views.append(TensorView("lm_head", "lm_head.weight", (1, 0), ((C,), (V,))))
    return views


def missing_tensors(model: Llama) -> dict[str, np.ndarray]:
    """Tensors Hugging Face's Llama has that a `Llama` lacks: none."""
    del model
    return {}
