"""A GPT language model, written like nanoGPT, with a logical axis on every weight.

Read top to bottom: config, helpers, `Block`, `GPT`, loss, counting, sampling.

The model knows nothing of meshes. Each weight is a plain array whose jaxtyping
annotation names its dims (`w_mlp_in: Float[Array, "embed mlp"]`); a Titanax plan maps
those logical axes (`embed`, `heads`, `head_dim`, `mlp`, `vocab`, `ctx`) onto mesh
axes. The dim of size 3 that stacks q, k and v is numeric, so it is never sharded.

Activations name their logical axes too (`batch`, `seq`, `embed`, ...), for an
optional activation layout given from outside (`GPTConfig.layout`, e.g.
`tx.Activations(plan, mesh)`): the model calls it at block boundaries, for attention
and at its entry and exit (and, under sequence parallelism, for the projections into
and out of attention and the MLP), and it splits the sequence (context and sequence
parallelism) as its plan says. Without one, XLA places activations from the weights.

The layers are one `Block` whose arrays carry a leading `layers` dim (built with
`eqx.filter_vmap`, run with `jax.lax.scan`), the dim a pipeline splits into stages.
The pieces a pipeline needs are public: `GPT.embed`, `apply_block`, `run_blocks`,
`GPT.head` and `loss_from_logits`.

Under Megatron tensor parallelism (`heads` and `mlp` mapped to one mesh axis) the QKV
and MLP-up weights are column-parallel and the attention-out and MLP-down weights are
row-parallel: the head dim is kept explicit in every weight so no reshape ever splits
or merges a sharded dim.
"""

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

# Rematerialisation policies by name (`GPTConfig.remat`): what each block keeps for
# the backward pass. "none" keeps everything; "full" keeps only the block's input and
# recomputes the rest; "dots" keeps matmul outputs; "dots_no_batch" keeps the
# outputs of matmuls with weights (not attention's batched ones).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical axes of the activations, for `GPTConfig.layout`: the residual stream
# between blocks, attention's queries/keys/values, and the tokens.
RESIDUAL_AXES = ("batch", "seq", "embed")
HEAD_AXES = ("batch", "seq", "heads", "head_dim")
MLP_AXES = ("batch", "seq", "mlp")
# The row-parallel attention-out weight's, for the layout's `project_out`.
ATTN_OUT_AXES = ("heads", "head_dim", "embed")
TOKEN_AXES = ("batch", "seq")
_LAYOUT_METHODS = (
    "constrain",
    "attention",
    "positions",
    "to_compute_order",
    "to_natural_order",
)
# And those a layout with `sequence_parallel` true must have too.
_SP_LAYOUT_METHODS = ("project_in", "project_out")


def check_layout(layout: Any, dropout: float = 0.0) -> None:
    """Raise `ValueError` unless `layout` is None or has the activation-layout
    methods (`_LAYOUT_METHODS`, and `_SP_LAYOUT_METHODS` under sequence
    parallelism); attention dropout needs the explicit attention, which a
    context-parallel layout replaces, so it is refused there."""
    if layout is None:
        return
    methods = _LAYOUT_METHODS
    if getattr(layout, "sequence_parallel", False):
        methods += _SP_LAYOUT_METHODS
    missing = [m for m in methods if not callable(getattr(layout, m, None))]
    if missing:
        raise ValueError(
            "`layout` must be None or an activation layout such as "
            f"`tx.Activations(plan, mesh)`, got {type(layout).__name__} without "
            f"{missing}."
        )
    if dropout > 0.0 and getattr(layout, "context_parallel", False):
        raise ValueError(
            f"`dropout` must be 0 under context parallelism, got {dropout}: ring "
            "attention has no attention-probability dropout."
        )


# Deepest stack `unroll=None` unrolls (measured: 4 layers unrolled compile and run
# faster than scanned on CPU; 12 layers compile 4x slower unrolled).
UNROLL_MAX_LAYERS = 6


def resolve_unroll(unroll: bool | int | None, n_layer: int) -> bool | int:
    """A config's `unroll` for `jax.lax.scan`: `None` means `True` up to
    `UNROLL_MAX_LAYERS` layers and `False` beyond."""
    if unroll is None:
        return n_layer <= UNROLL_MAX_LAYERS
    return unroll


# ----------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a `GPT`. Frozen, so it can be a static field of a module.

    Make one directly or from a preset: `GPTConfig.preset("small", dropout=0.1)`.
    Parameters are always created in float32; lower-precision compute is the job of
    the training step (`tx.Precision`), not of the model.
    """

    # Number of token ids; 50304 pads GPT-2's 50257 to a multiple of 64 for speed.
    vocab_size: int = 256
    # Longest sequence the model can read (the context length).
    block_size: int = 64
    # Number of transformer blocks (the size of the stacked `layers` dim).
    n_layer: int = 4
    # Number of attention heads; must divide `n_embd`.
    n_head: int = 4
    # Width of the residual stream.
    n_embd: int = 128
    # Dropout rate on attention probabilities and residual branches; 0 disables it.
    dropout: float = 0.0
    # Biases in linear layers and LayerNorms, like GPT-2. False is a bit better and
    # faster (nanoGPT).
    bias: bool = False
    # Share the token embedding with the LM head (GPT-2 does). Untied is simpler to
    # pipeline, since the first and last stages then hold no common weight.
    tie_weights: bool = False
    # How `run_blocks` loops over the stacked layers. `True` unrolls them: a scan
    # zero-fills stacked buffers and slices each layer in and out of them, and on
    # the 4-layer `baby` CPU step unrolling cut the scratch memory by a third, the
    # step time by ~20% and even the compile time (12 vs 19 s). An int `k` scans
    # `k` layers per iteration; `False` (or 1) is a plain `lax.scan`, whose compile
    # time stays flat in depth: GPT-2 124M's 12 layers compiled in 10 s scanned and
    # 41 s unrolled. `None` (the default) unrolls up to `UNROLL_MAX_LAYERS` layers
    # and scans deeper stacks; see `layer_unroll`.
    unroll: bool | int | None = None
    # Rematerialisation of each block in the backward pass: one of
    # `REMAT_POLICIES` ("none", "full", "dots", "dots_no_batch").
    remat: str = "none"
    # `jax.nn.dot_product_attention`'s `implementation`: `None` (JAX picks: cuDNN's
    # fused attention on GPUs where it applies; on the CPU the "explicit" form,
    # which ran the `baby` step ~4% faster), "xla", or "cudnn" (GPU, bf16/fp16
    # only); or "explicit": scores, mask, softmax and sum written out (on the `baby`
    # CPU step 3% less memory traffic than "xla"). Attention dropout always uses
    # the explicit form. Under context parallelism the layout's ring attention
    # runs instead.
    attention: str | None = None
    # Where the activations live: `None` (XLA propagates the weights' shardings),
    # or an activation layout given from outside, such as `tx.Activations(plan,
    # mesh)`. The model calls its `constrain` on the residual stream at block
    # boundaries, its `attention`, and `positions`, `to_compute_order` and
    # `to_natural_order` at its entry and exit (all with logical axis names, never
    # a mesh): that is how context and sequence parallelism reach the model. A
    # layout whose `sequence_parallel` is true also projects into and out of
    # attention and the MLP (`project_in`, `project_out`).
    layout: Any = None

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"`n_head` must divide `n_embd`, got n_embd={self.n_embd} and "
                f"n_head={self.n_head}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"`remat` must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}."
            )
        if self.attention not in (None, "xla", "cudnn", "explicit"):
            raise ValueError(
                "`attention` must be None, 'xla', 'cudnn' or 'explicit', got "
                f"{self.attention!r}."
            )
        check_layout(self.layout, self.dropout)

    @property
    def layer_unroll(self) -> bool | int:
        """`unroll`, with `None` resolved: `True` for at most `UNROLL_MAX_LAYERS`
        layers, else `False` (a scan)."""
        return resolve_unroll(self.unroll, self.n_layer)

    @property
    def head_dim(self) -> int:
        """Size of one attention head, `n_embd // n_head`."""
        return self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        """Hidden width of the MLP, four times `n_embd` as in GPT-2."""
        return 4 * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named preset from `PRESETS`, with some fields replaced.

        **Arguments:**

        - `name`: one of `"tiny"` (fast tests), `"baby"` (byte-level, trains on a CPU
            in minutes) or `"small"` (GPT-2 124M).
        - `**overrides`: fields to replace, e.g. `dropout=0.1`.

        **Returns:**

        A `GPTConfig`.
        """
        if name not in PRESETS:
            raise ValueError(
                f"Unknown GPT preset {name!r}; choose one of {sorted(PRESETS)}."
            )
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32),
    "baby": GPTConfig(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128),
    # GPT-2 124M: biases and tied embeddings as in the released checkpoint.
    "small": GPTConfig(
        vocab_size=50304,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        bias=True,
        tie_weights=True,
    ),
}

# ----------------------------------------------------------------------------
# Helpers


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.normal(key, shape, jnp.float32)


def _layer_norm(x: Array, scale: Array, bias: Array | None, eps: float = 1e-5):
    # Statistics in float32 even when activations are bf16: the variance of a wide
    # residual stream loses too many bits otherwise.
    return _layer_norm_vjp(x, scale, bias, eps)


def _normalized(x: Array, eps: float) -> tuple[Array, Array]:
    """`(x - mean) / std` over the last dim in float32, and `1 / std`."""
    x32 = x.astype(jnp.float32)
    centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(var + eps)
    return centered * inv_std, inv_std


def _layer_norm_fwd(x, scale, bias, eps):
    x_hat, inv_std = _normalized(x, eps)
    y = x_hat * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x_hat, inv_std, scale, bias)


def _layer_norm_bwd(eps, res, dy):
    # The closed form, two reductions per token: autodiff through the mean and
    # the variance emits several more, and LayerNorm's backward was ~6% of the
    # `baby` CPU step (this form took ~4.5% off it).
    del eps
    x_hat, inv_std, scale, bias = res
    dtype, dy = dy.dtype, dy.astype(jnp.float32)
    g = dy * scale.astype(jnp.float32)
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gx = jnp.mean(g * x_hat, axis=-1, keepdims=True)
    dx = inv_std * (g - mean_g - x_hat * mean_gx)
    tokens = tuple(range(dy.ndim - 1))
    d_scale = jnp.sum(dy * x_hat, axis=tokens).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(dy, axis=tokens).astype(bias.dtype)
    return dx.astype(dtype), d_scale, d_bias


_layer_norm_vjp = jax.custom_vjp(
    lambda x, scale, bias, eps: _layer_norm_fwd(x, scale, bias, eps)[0],
    nondiff_argnums=(3,),
)
_layer_norm_vjp.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def _matmul_transposed_grad(x: Array, w: Array) -> Array:
    return x @ w


def _matmul_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return x @ w, (x, w)


def _matmul_bwd(res: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    x, w = res
    dx = dy @ w.T
    # The barrier keeps `x.T` a real (cheap) transpose: XLA would otherwise fold
    # it into a transposed-operand matmul, which XLA:CPU runs ~20% slower.
    dw = jax.lax.optimization_barrier(x.T) @ dy
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_transposed_grad.defvjp(_matmul_fwd, _matmul_bwd)


def _matmul(config: Any, x: Float[Array, "*N I"], w: Float[Array, "I O"]) -> Array:
    """`x @ w` for tokens `x` (2-D, or 3-D under a layout) and a weight `w`.

    On the CPU its backward pass multiplies a transposed copy of `x` into the
    weight's gradient: XLA:CPU's matmul with a transposed left operand (what
    autodiff emits) is its slowest form, and this took the `baby` GPT step ~6%
    faster. Elsewhere, for 3-D tokens, and under rematerialisation (whose
    policies pick the matmuls to save by their primitive, which a custom gradient
    hides), it is plain `x @ w`.
    """
    if x.ndim == 2 and config.remat == "none" and jax.default_backend() == "cpu":
        return _matmul_transposed_grad(x, w)
    return x @ w


def _written_out_attention(config: Any) -> bool:
    """Whether attention is the written-out computation (scores, mask, softmax,
    weighted sum): asked for (`"explicit"`), or JAX's choice (`None`) on the CPU,
    where it ran the `baby` GPT step ~4% faster than
    `jax.nn.dot_product_attention`'s XLA implementation."""
    if config.attention == "explicit":
        return True
    return config.attention is None and jax.default_backend() == "cpu"


def _dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    # No key means inference: evaluation and sampling pass key=None.
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def token_shape(config: Any, B: int, T: int) -> tuple[int, ...]:
    """The leading dims of a linear layer's input: `(B*T,)`, or `(B, T)` when the
    config has a layout.

    2-D matmuls run XLA's CPU backward ~2x faster than 3-D ones. But a layout may
    split `seq` while `batch` is whole (context and sequence parallelism), and a
    split minor dim cannot be merged into a major one without gathering it: with a
    layout the activations keep their `batch` and `seq` dims.
    """
    return (B * T,) if config.layout is None else (B, T)


def _constrain(config: Any, x: Array, *, sequence_parallel: bool = True) -> Array:
    """The residual stream `(B, T, C)`, split as the config's layout says; with
    `sequence_parallel=False`, as an input of attention or the MLP (where sequence
    parallelism gathers the sequence)."""
    if config.layout is None:
        return x
    return config.layout.constrain(
        x, RESIDUAL_AXES, sequence_parallel=sequence_parallel
    )


def is_sequence_parallel(config: Any) -> bool:
    """Whether the config's layout splits the sequence over TP's axis (Megatron
    sequence parallelism): attention and the MLP then project their input and
    output through the layout's `project_in` and `project_out`, which gather the
    sequence and reduce-scatter it back explicitly."""
    return config.layout is not None and getattr(
        config.layout, "sequence_parallel", False
    )


def _split(key: PRNGKeyArray | None, n: int) -> list[PRNGKeyArray | None]:
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def _cpu_float16(x: Array) -> bool:
    """Whether `x` is float16 on the CPU, where XLA cannot multiply float16 matrices
    into a float32 result (`jax.nn.dot_product_attention`'s scores)."""
    return x.dtype == jnp.float16 and jax.default_backend() == "cpu"


def attention(
    q: Float[Array, "B T N D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K D"],
    *,
    implementation: str | None = None,
) -> Float[Array, "B T N D"]:
    """Causal scaled dot-product attention through `jax.nn.dot_product_attention`.

    XLA's implementation is the explicit computation (scores, mask, float32
    softmax, weighted sum; float16 inputs on the CPU are computed in float32, which
    XLA:CPU's float16 matmuls cannot produce); on GPUs `implementation="cudnn"`
    selects cuDNN's fused attention. `K` key/value heads serve groups of `N / K`
    query heads (grouped-query attention).

    **Arguments:**

    - `q`: queries `(batch, time, heads, head_dim)`.
    - `k`, `v`: keys and values `(batch, time, kv_heads, head_dim)`.
    - `implementation`: `None`, `"xla"` or `"cudnn"`.

    **Returns:**

    The attended values, `(batch, time, heads, head_dim)`.
    """
    impl: Any = implementation
    if _cpu_float16(q):
        f32 = [a.astype(jnp.float32) for a in (q, k, v)]
        y = jax.nn.dot_product_attention(*f32, is_causal=True, implementation=impl)
        return y.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def run_layers(
    layer_fn: Any,
    blocks: Any,
    h: Array,
    key: PRNGKeyArray | None = None,
    *,
    unroll: bool | int = True,
    remat: str = "none",
) -> Array:
    """Run `layer_fn(layer, h, key) -> h` over a stack of layers, in order.

    `blocks` is a module whose arrays carry a leading `layers` dim. The loop is a
    `jax.lax.scan` with `unroll` (see `GPTConfig.unroll`: `True` inlines every
    layer), each layer rematerialised by the `remat` policy (`REMAT_POLICIES`).

    **Arguments:**

    - `layer_fn`: `(layer, h, key) -> h` for one unstacked layer.
    - `blocks`: the stacked layers.
    - `h`: the hidden states.
    - `key`: a PRNG key, split once per layer, or `None`.
    - `unroll`, `remat`: as above.

    **Returns:**

    The hidden states after the last layer.
    """
    params, static = eqx.partition(blocks, eqx.is_array)
    n_layers = jax.tree.leaves(params)[0].shape[0]
    keys = None if key is None else jax.random.split(key, n_layers)

    def step(h, layer):
        layer_params, layer_key = layer
        return layer_fn(eqx.combine(layer_params, static), h, layer_key), None

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat])
    h, _ = jax.lax.scan(step, h, (params, keys), unroll=unroll)
    return h


# ----------------------------------------------------------------------------
# One transformer block


class Block(eqx.Module):
    """One pre-LayerNorm transformer block: causal self-attention, then an MLP.

    In a `GPT` the blocks are stacked: every array below gains a leading `layers` dim,
    which the annotations leave out (Titanax adds it).

    **Arguments:**

    - `config`: the model's `GPTConfig`.
    - `key`: a PRNG key for the initial weights.
    """

    ln1_scale: Float[Array, "embed"]
    ln1_bias: Float[Array, "embed"] | None
    # Column-parallel: each head's q, k and v are computed from the whole stream.
    # Heads-major, so one 2-D matmul computes them all (`(C, heads * 3 * head_dim)`)
    # and a sharded `heads` dim stays a contiguous block of its columns under TP.
    w_qkv: Float[Array, "embed heads 3 head_dim"]
    b_qkv: Float[Array, "heads 3 head_dim"] | None
    # Row-parallel: a sum over heads, so sharded heads end in one all-reduce.
    w_attn_out: Float[Array, "heads head_dim embed"]
    b_attn_out: Float[Array, "embed"] | None
    ln2_scale: Float[Array, "embed"]
    ln2_bias: Float[Array, "embed"] | None
    w_mlp_in: Float[Array, "embed mlp"]
    b_mlp_in: Float[Array, "mlp"] | None
    w_mlp_out: Float[Array, "mlp embed"]
    b_mlp_out: Float[Array, "embed"] | None
    config: GPTConfig = eqx.field(static=True)

    def __init__(self, config: GPTConfig, *, key: PRNGKeyArray):
        c, nh, hs, m = config.n_embd, config.n_head, config.head_dim, config.mlp_size
        k_qkv, k_attn_out, k_mlp_in, k_mlp_out = jax.random.split(key, 4)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): each block
        # adds two of them to the stream, and its variance must not grow with depth.
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)

        def zeros(*shape):
            return jnp.zeros(shape, jnp.float32) if config.bias else None

        self.ln1_scale = jnp.ones((c,), jnp.float32)
        self.ln1_bias = zeros(c)
        self.w_qkv = _normal(k_qkv, (c, nh, 3, hs), 0.02)
        self.b_qkv = zeros(nh, 3, hs)
        self.w_attn_out = _normal(k_attn_out, (nh, hs, c), resid_std)
        self.b_attn_out = zeros(c)
        self.ln2_scale = jnp.ones((c,), jnp.float32)
        self.ln2_bias = zeros(c)
        self.w_mlp_in = _normal(k_mlp_in, (c, m), 0.02)
        self.b_mlp_in = zeros(m)
        self.w_mlp_out = _normal(k_mlp_out, (m, c), resid_std)
        self.b_mlp_out = zeros(c)
        self.config = config

    def attention(
        self, x: Float[Array, "B T C"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B T C"]:
        """Causal multi-head self-attention, without the LayerNorm or residual."""
        B, T, C = x.shape
        nh, hs = self.config.n_head, self.config.head_dim
        k_att, k_resid = _split(key, 2)
        # Linear layers see 2-D tokens: XLA's CPU backward is ~2x faster than on 3-D
        # (unless a layout splits the sequence: `token_shape`). One (B*T, C) @
        # (C, 3C) matmul: an einsum into a separate q/k/v dim cost ~10% more memory
        # traffic per step in slice and pad copies.
        lead = token_shape(self.config, B, T)
        x = x.reshape(*lead, C)  # (B*T, C)
        sp = is_sequence_parallel(self.config)
        if sp:  # x: (B, T, C) split on `seq` over TP's axis; gathered in there
            (qkv,) = self.config.layout.project_in(
                x, [self.w_qkv.reshape(C, 3 * C)], w_names=[("embed", "heads")]
            )  # (B, T, nh*3*hs)
        else:
            qkv = _matmul(
                self.config, x, self.w_qkv.reshape(C, 3 * C)
            )  # (B*T, nh*3*hs)
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv.reshape(3 * C)
        qkv = qkv.reshape(B, T, nh, 3, hs)  # (B, T, nh, 3, hs)
        q, k, v = (a[:, :, :, 0] for a in jnp.split(qkv, 3, axis=3))  # (B, T, nh, hs)
        dropout = k_att is not None and self.config.dropout > 0.0
        layout = self.config.layout
        if layout is not None and layout.context_parallel:
            # The sequence is split: ring attention over the context axis.
            y = layout.attention(q, k, v, names=HEAD_AXES)
        elif not dropout and not _written_out_attention(self.config):
            y = attention(q, k, v, implementation=self.config.attention)
        else:
            # Written out (dropout on the attention probabilities needs them).
            # Scores and softmax in float32 even for bf16 inputs: exp overflows
            # otherwise.
            if _cpu_float16(q):  # XLA:CPU has no float16 x float16 -> float32 dot
                q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            att = jnp.einsum(
                "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
            )  # (B, nh, T, T)
            att = att * (1.0 / math.sqrt(hs))
            causal = jnp.tril(jnp.ones((T, T), dtype=bool))
            att = jnp.where(causal, att, -jnp.inf)
            att = jax.nn.softmax(att, axis=-1).astype(v.dtype)
            att = _dropout(att, self.config.dropout, k_att)
            y = jnp.einsum("bhqk,bkhd->bqhd", att, v)  # (B, T, nh, hs)
        y = y.reshape(*lead, nh, hs)  # (B*T, nh, hs)
        if sp:  # reduce-scattered onto the residual stream's sequence shards
            y = self.config.layout.project_out(
                y, self.w_attn_out, names=HEAD_AXES, w_names=ATTN_OUT_AXES
            )  # (B, T, C)
        else:
            y = _matmul(self.config, y.reshape(*lead, C), self.w_attn_out.reshape(C, C))
        if self.b_attn_out is not None:
            y = y + self.b_attn_out
        y = _dropout(y, self.config.dropout, k_resid)
        return y.reshape(B, T, C)  # (B, T, C)

    def mlp(
        self, x: Float[Array, "B T C"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B T C"]:
        """The position-wise MLP, without the LayerNorm or residual."""
        B, T, C = x.shape
        x = x.reshape(*token_shape(self.config, B, T), C)  # (B*T, C)
        sp = is_sequence_parallel(self.config)
        if sp:  # as in `attention`: the sequence gathered, then reduce-scattered
            (h,) = self.config.layout.project_in(
                x, [self.w_mlp_in], w_names=[("embed", "mlp")]
            )  # (B, T, 4C)
        else:
            h = _matmul(self.config, x, self.w_mlp_in)  # (B*T, 4C)
        if self.b_mlp_in is not None:
            h = h + self.b_mlp_in
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's tanh approximation
        if sp:
            y = self.config.layout.project_out(
                h, self.w_mlp_out, names=MLP_AXES, w_names=("mlp", "embed")
            )  # (B, T, C)
        else:
            y = _matmul(self.config, h, self.w_mlp_out)  # (B*T, C)
        if self.b_mlp_out is not None:
            y = y + self.b_mlp_out
        y = _dropout(y, self.config.dropout, key)
        return y.reshape(B, T, C)  # (B, T, C)

    def __call__(
        self, x: Float[Array, "B T C"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B T C"]:
        """Run one (unstacked) block on hidden states `x` of shape `(B, T, C)`.

        **Arguments:**

        - `x`: hidden states, `(batch, time, n_embd)`.
        - `key`: a PRNG key for dropout, or `None` for no dropout.

        **Returns:**

        Hidden states of the same shape and dtype.
        """
        k_attn, k_mlp = _split(key, 2)
        # With a layout, the residual stream is constrained at each boundary and
        # the sublayers' inputs as such. Under sequence parallelism the norms run
        # on sequence shards and the inputs stay split: each sublayer all-gathers
        # its input and reduce-scatters its row-parallel output itself
        # (`project_in` / `project_out`), so that no backend turns either into an
        # all-reduce of the whole activation.
        sp = is_sequence_parallel(self.config)
        h = _layer_norm(x, self.ln1_scale, self.ln1_bias)
        h = _constrain(self.config, h, sequence_parallel=sp)
        x = _constrain(self.config, x + self.attention(h, key=k_attn))
        h = _layer_norm(x, self.ln2_scale, self.ln2_bias)
        h = _constrain(self.config, h, sequence_parallel=sp)
        return _constrain(self.config, x + self.mlp(h, key=k_mlp))


def apply_block(
    block: Block, h: Float[Array, "B T C"], key: PRNGKeyArray | None = None
) -> Float[Array, "B T C"]:
    """Run a single layer (a `Block` without the `layers` dim) on hidden states.

    **Arguments:**

    - `block`: one layer, e.g. `jax.tree.map(lambda a: a[i], gpt.blocks)`.
    - `h`: hidden states, `(batch, time, n_embd)`.
    - `key`: a PRNG key for dropout, or `None` for no dropout.

    **Returns:**

    Hidden states of the same shape.
    """
    return block(h, key=key)


def run_blocks(
    blocks: Block, h: Float[Array, "B T C"], key: PRNGKeyArray | None = None
) -> Float[Array, "B T C"]:
    """Run a stack of layers (a `Block` with a leading `layers` dim) in order.

    A pipeline stage calls this on its slice of `GPT.blocks`. The layers run in a
    `jax.lax.scan` unrolled by `config.layer_unroll` and rematerialised by
    `config.remat`
    (see `run_layers`).

    **Arguments:**

    - `blocks`: stacked layers; every array has a leading `layers` dim.
    - `h`: hidden states, `(batch, time, n_embd)`.
    - `key`: a PRNG key for dropout (split once per layer), or `None`.

    **Returns:**

    Hidden states of the same shape.
    """
    config = blocks.config
    return run_layers(
        apply_block, blocks, h, key, unroll=config.layer_unroll, remat=config.remat
    )


# ----------------------------------------------------------------------------
# The model


class GPT(eqx.Module):
    """A GPT-2 style decoder-only transformer.

    `gpt(tokens)` maps int tokens `(B, T)` to logits `(B, T, vocab_size)`. The same
    computation in parts, for a pipeline: `gpt.head(run_blocks(gpt.blocks,
    gpt.embed(tokens)))`.

    **Arguments:**

    - `config`: a `GPTConfig`.
    - `key`: a PRNG key for the initial weights.

    !!! Example

        ```python
        config = GPTConfig.preset("tiny")
        model = GPT(config, key=jax.random.key(0))
        logits = model(jnp.zeros((2, 16), jnp.int32))  # (2, 16, 64)
        ```
    """

    wte: Float[Array, "vocab embed"]
    # "ctx" is a parameter-only name that plans leave unmapped, so wpe is replicated
    # even where activations' "seq" dim is sharded.
    wpe: Float[Array, "ctx embed"]
    blocks: Block
    lnf_scale: Float[Array, "embed"]
    lnf_bias: Float[Array, "embed"] | None
    # None when tied: the head then reuses `wte`.
    lm_head: Float[Array, "embed vocab"] | None
    config: GPTConfig = eqx.field(static=True)

    def __init__(self, config: GPTConfig, *, key: PRNGKeyArray):
        k_wte, k_wpe, k_blocks, k_head = jax.random.split(key, 4)
        c = config.n_embd
        self.wte = _normal(k_wte, (config.vocab_size, c), 0.02)
        self.wpe = _normal(k_wpe, (config.block_size, c), 0.02)
        layer_keys = jax.random.split(k_blocks, config.n_layer)
        self.blocks = eqx.filter_vmap(lambda k: Block(config, key=k))(layer_keys)
        self.lnf_scale = jnp.ones((c,), jnp.float32)
        self.lnf_bias = jnp.zeros((c,), jnp.float32) if config.bias else None
        if config.tie_weights:
            self.lm_head = None
        else:
            self.lm_head = _normal(k_head, (c, config.vocab_size), 0.02)
        self.config = config

    def embed(
        self, tokens: Int[Array, "B T"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B T C"]:
        """Token plus position embeddings, the input to the first block.

        **Arguments:**

        - `tokens`: int token ids, `(batch, time)` with `time <= block_size`.
        - `key`: a PRNG key for dropout, or `None`.

        **Returns:**

        Hidden states `(batch, time, n_embd)`.
        """
        T = tokens.shape[-1]
        assert T <= self.config.block_size, (
            f"Cannot forward sequence of length {T}, "
            f"block size is only {self.config.block_size}"
        )
        layout = self.config.layout
        if layout is None:
            h = self.wte[tokens] + self.wpe[:T]  # (B, T, C)
        else:
            # The model computes in the layout's order (zigzag under context
            # parallelism, for balanced causal work): tokens and positions alike.
            tokens = layout.to_compute_order(tokens, TOKEN_AXES)
            h = self.wte[tokens] + self.wpe[layout.positions(T)]  # (B, T, C)
            h = layout.constrain(h, RESIDUAL_AXES)
        return _dropout(h, self.config.dropout, key)

    def head(self, h: Float[Array, "B T C"]) -> Float[Array, "B T V"]:
        """Final LayerNorm and LM head: hidden states to logits.

        **Arguments:**

        - `h`: hidden states from the last block, `(batch, time, n_embd)`.

        **Returns:**

        Logits `(batch, time, vocab_size)`, in the dtype of `h`.
        """
        B, T, C = h.shape
        if self.config.layout is not None:  # back to the data's order
            h = self.config.layout.to_natural_order(h, RESIDUAL_AXES)
        h = _layer_norm(h, self.lnf_scale, self.lnf_bias)
        h = _constrain(self.config, h, sequence_parallel=False)
        h = h.reshape(*token_shape(self.config, B, T), C)  # (B*T, C)
        if self.lm_head is None:
            logits = jnp.einsum("...c,vc->...v", h, self.wte)  # (B*T, V)
        else:
            logits = h @ self.lm_head  # (B*T, V)
        return logits.reshape(B, T, -1)  # (B, T, V)

    def __call__(
        self, tokens: Int[Array, "B T"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B T V"]:
        """Logits for every position.

        **Arguments:**

        - `tokens`: int token ids, `(batch, time)` with `time <= block_size`.
        - `key`: a PRNG key for dropout, or `None` for no dropout (evaluation).

        **Returns:**

        Logits `(batch, time, vocab_size)`.
        """
        k_embed, k_blocks = _split(key, 2)
        h = self.embed(tokens, key=k_embed)
        h = run_blocks(self.blocks, h, k_blocks)
        return self.head(h)


# ----------------------------------------------------------------------------
# Loss


def cross_entropy(
    logits: Float[Array, "*B V"], labels: Int[Array, "*B"]
) -> Float[Array, "*B"]:
    """Softmax cross-entropy per position, in float32.

    Written as `logsumexp(logits) - sum(logits * one_hot(labels))` rather than with
    `take_along_axis`: it needs only reductions over the vocab dim, so it stays
    vocab-parallel when the logits are sharded on `vocab` (no gather of the logits).

    **Arguments:**

    - `logits`: unnormalised log-probabilities, vocab last.
    - `labels`: int class ids of the leading shape.

    **Returns:**

    The negative log-likelihood of each label, float32.
    """
    logits = logits.astype(jnp.float32)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * one_hot, axis=-1)


def loss_from_logits(
    logits: Float[Array, "B T V"], labels: Int[Array, "B T"]
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Mean next-token cross-entropy and accuracy.

    Labels below 0 are ignored (nanoGPT's `ignore_index=-1`), e.g. for padding.

    **Arguments:**

    - `logits`: `(batch, time, vocab_size)`.
    - `labels`: int targets `(batch, time)`.

    **Returns:**

    `(loss, {"accuracy": accuracy})`, float32 scalars.
    """
    valid = (labels >= 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(valid), 1.0)
    loss = jnp.sum(cross_entropy(logits, labels) * valid) / n
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return loss, {"accuracy": jnp.sum(hits * valid) / n}


def gpt_loss(
    model: GPT, batch: dict[str, Array], key: PRNGKeyArray | None = None
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Next-token loss of a `GPT` on a batch, in the Titanax `loss` signature.

    **Arguments:**

    - `model`: the `GPT`.
    - `batch`: `{"x": int (B, T), "y": int (B, T)}` where `y` is `x` shifted left by
        one (as nanoGPT's `get_batch` returns). Labels below 0 are ignored.
    - `key`: a PRNG key for dropout, or `None` for no dropout.

    **Returns:**

    `(loss, {"accuracy": accuracy})`, float32 scalars.
    """
    logits = model(batch["x"], key=key)
    return loss_from_logits(logits, batch["y"])


# ----------------------------------------------------------------------------
# Counting


def param_count(model: "GPT | GPTConfig", *, non_embedding: bool = False) -> int:
    """Number of parameters (array elements) of a model or of the model a config makes.

    **Arguments:**

    - `model`: a `GPT` (or any module, possibly of `jax.ShapeDtypeStruct`s), or a
        `GPTConfig`, which is counted without allocating any weights.
    - `non_embedding`: if `True`, leave out the position embeddings, and the token
        embeddings unless they are tied (then they are the LM head's matmul weight),
        as nanoGPT's `get_num_params` does. This is the `N` of `flops_per_token`.

    **Returns:**

    The count, a Python `int`.
    """
    if isinstance(model, GPTConfig):
        config = model
        model = eqx.filter_eval_shape(lambda k: GPT(config, key=k), jax.random.key(0))
    leaves = jax.tree.leaves(
        model, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )
    n = sum(math.prod(x.shape) for x in leaves if hasattr(x, "shape"))
    if non_embedding and isinstance(model, GPT):
        n -= math.prod(model.wpe.shape)
        if model.lm_head is not None:
            n -= math.prod(model.wte.shape)
    return n


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token, forward and backward: `6 N + 12 L H Q T`.

    The estimate of the PaLM paper (appendix B) that nanoGPT uses for MFU: `6 N` for
    the matmuls with weights (`N = param_count(config, non_embedding=True)`) and
    `12 L H Q T` for attention's two `T x T` matmuls.

    **Arguments:**

    - `config`: the model's `GPTConfig`.
    - `seq_len`: the sequence length `T` trained on; defaults to `block_size`.

    **Returns:**

    FLOPs per token, a Python `int`.
    """
    n = param_count(config, non_embedding=True)
    T = config.block_size if seq_len is None else seq_len
    L, H, Q = config.n_layer, config.n_head, config.head_dim
    return 6 * n + 12 * L * H * Q * T


# ----------------------------------------------------------------------------
# Sampling


def generate(
    model: GPT,
    tokens: Int[Array, "B T0"],
    n_new: int,
    key: PRNGKeyArray,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Int[Array, "B T0+n_new"]:
    """Sample `n_new` tokens after `tokens`, nanoGPT's `generate` without a KV cache.

    The context is cropped to the last `block_size` tokens. All steps run in one
    compiled loop over a fixed-size window, so the sequence growing never recompiles.

    **Arguments:**

    - `model`: the `GPT`; dropout is off while sampling.
    - `tokens`: int prompt `(batch, T0)`, `T0 >= 1`.
    - `n_new`: number of tokens to add.
    - `key`: a PRNG key for sampling.
    - `temperature`: divides the logits; `0` picks the most likely token (greedy).
    - `top_k`: if given, sample only among the `top_k` most likely tokens.

    **Returns:**

    The prompt followed by the new tokens, `(batch, T0 + n_new)`.
    """
    return _generate(model, tokens, n_new, key, temperature, top_k)


@eqx.filter_jit
def _generate(model, tokens, n_new, key, temperature, top_k):
    B, T0 = tokens.shape
    total = T0 + n_new
    # A fixed window: before it fills, the positions past the current end hold zeros,
    # which the causal mask keeps from reaching the logits that are read.
    window = min(model.config.block_size, total)
    buf = jnp.zeros((B, total), tokens.dtype).at[:, :T0].set(tokens)

    def step(i, carry):
        buf, key = carry
        length = T0 + i
        start = jnp.maximum(length - window, 0)
        ctx = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=1)  # (B, W)
        logits = model(ctx)  # (B, W, V)
        logits = jax.lax.dynamic_index_in_dim(
            logits, length - 1 - start, axis=1, keepdims=False
        ).astype(jnp.float32)  # (B, V)
        key, k = jax.random.split(key)
        if temperature == 0:
            nxt = jnp.argmax(logits, axis=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            nxt = jax.random.categorical(k, logits, axis=-1)
        buf = jax.lax.dynamic_update_index_in_dim(
            buf, nxt.astype(buf.dtype), length, axis=1
        )
        return buf, key

    buf, _ = jax.lax.fori_loop(0, n_new, step, (buf, key))
    return buf
