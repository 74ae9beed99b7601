"""Reference models: shapes, GPT arithmetic, causality, loss and logical axes."""

import math
import typing
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models.cnn import CNN
from models.cnn import cross_entropy_loss as cnn_loss
from models.gpt import (
    GPT,
    Block,
    GPTConfig,
    apply_block,
    cross_entropy,
    flops_per_token,
    generate,
    gpt_loss,
    loss_from_logits,
    param_count,
    run_blocks,
)
from models.mlp import MLP, cross_entropy_loss


# Eager GPT calls retrace their layer scan each time (~1 s); compiled ones are fast.
@jax.jit
def _forward(model, tokens, key=None):
    return model(tokens, key=key)


_loss = jax.jit(gpt_loss)


@jax.jit
def _forward_and_loss(model, batch):
    logits = model(batch["x"])
    return logits, loss_from_logits(logits, batch["y"])[0]


def _abstract_tiny(**overrides):
    """A tiny GPT of ShapeDtypeStructs: no weights allocated, nothing compiled."""
    config = GPTConfig.preset("tiny", **overrides)
    return eqx.filter_eval_shape(lambda k: GPT(config, key=k), jax.random.key(0))


def _tokens(key, shape, vocab=64):
    return jax.random.randint(key, shape, 0, vocab)


def _dims(cls, field):
    """Logical dim names of a field's jaxtyping annotation (None when unannotated)."""
    hint = typing.get_type_hints(cls)[field]
    for arg in typing.get_args(hint) or (hint,):
        if hasattr(arg, "dim_str"):
            return tuple(arg.dim_str.split())
    return None


# ---------------------------------------------------------------------------- MLP


def test_mlp_forward_loss_and_axes(getkey):
    model = MLP(64, 10, (32, 32, 16), activation="relu", key=getkey())
    x = jax.random.normal(getkey(), (5, 8, 8))

    @jax.jit  # one compile instead of dozens of eager ones
    def run(model, x):
        batch = {"x": x, "y": jnp.arange(5)}
        return model(x), model(x.reshape(5, 64)), cross_entropy_loss(model, batch, None)

    logits, flat_logits, (loss, metrics) = run(model, x)
    assert logits.shape == (5, 10)
    np.testing.assert_array_equal(flat_logits, logits)
    assert loss.dtype == jnp.float32 and 0.0 <= metrics["accuracy"] <= 1.0
    # Hidden dims alternate mlp/embed: Megatron column/row pairs under a TP plan.
    names = [_dims(type(layer), "weight") for layer in model.layers]
    assert names == [("in", "mlp"), ("mlp", "embed"), ("embed", "mlp"), ("mlp", "out")]
    assert [layer.weight.shape for layer in model.layers] == [
        (64, 32),
        (32, 32),
        (32, 16),
        (16, 10),
    ]
    linear = eqx.filter_eval_shape(lambda k: MLP(4, 3, (), key=k), getkey())
    assert _dims(type(linear.layers[0]), "weight") == ("in", "out")
    with pytest.raises(ValueError, match="`activation`"):
        MLP(4, 3, activation="tanh", key=getkey())


# ---------------------------------------------------------------------------- CNN


def test_cnn_forward_and_loss(getkey):
    model = CNN(10, channels=(8, 16), key=getkey())
    x = jax.random.normal(getkey(), (3, 8, 8))

    @jax.jit
    def run(model, x):
        layouts = [model(x), model(x[:, None]), model(x.reshape(3, 64))]
        mnist = model(jnp.zeros((2, 1, 28, 28)))
        return layouts, mnist, cnn_loss(model, {"x": x, "y": jnp.arange(3)}, None)

    (logits, *others), mnist, (loss, metrics) = run(model, x)
    assert logits.shape == (3, 10) and mnist.shape == (2, 10)
    for other in others:
        np.testing.assert_allclose(other, logits, rtol=1e-6, atol=1e-6)
    assert jnp.isfinite(loss) and "accuracy" in metrics
    assert _dims(CNN, "w_head") == ("channels", "out")


# ---------------------------------------------------------------------------- GPT
# Compiles dominate these tests' time, so most share one model and one input shape.


@pytest.fixture(scope="module")
def tiny():
    return GPT(GPTConfig.preset("tiny"), key=jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return _tokens(jax.random.key(1), (2, 16))


def test_gpt_forward_shapes(tiny, tokens):
    logits = _forward(tiny, tokens)
    assert logits.shape == (2, 16, 64)

    # The pipeline's pieces compose to the whole model.
    @jax.jit
    def in_pieces(model, tokens):
        h = model.embed(tokens)
        assert h.shape == (2, 16, 32)
        return model.head(run_blocks(model.blocks, h))

    np.testing.assert_allclose(in_pieces(tiny, tokens), logits, atol=1e-6)
    with pytest.raises(AssertionError, match="block size is only 16"):
        jax.eval_shape(tiny, jnp.zeros((1, 17), jnp.int32))


def test_gpt_tied_and_bias(tiny):
    model = _abstract_tiny(tie_weights=True, bias=True)
    assert model.lm_head is None and model.blocks.b_qkv is not None
    out = eqx.filter_eval_shape(lambda m, t: m(t), model, jnp.zeros((2, 8), jnp.int32))
    assert out.shape == (2, 8, 64)
    biases = 2 * (32 + 3 * 32 + 32 + 32 + 4 * 32 + 32) + 32  # 2 blocks + final LN
    assert param_count(tiny) - param_count(model) == 32 * 64 - biases


def test_gpt_small_param_count():
    config = GPTConfig.preset("small")
    V, T, L, C = 50304, 1024, 12, 768
    per_block = (
        2 * C  # ln_1
        + C * 3 * C
        + 3 * C  # attention qkv
        + C * C
        + C  # attention out
        + 2 * C  # ln_2
        + C * 4 * C
        + 4 * C  # mlp in
        + 4 * C * C
        + C  # mlp out
    )
    expected = V * C + T * C + L * per_block + 2 * C  # wte (tied) + wpe + ln_f
    assert expected == 124_475_904
    assert param_count(config) == expected
    # GPT-2's released vocabulary gives its well-known count.
    assert param_count(GPTConfig.preset("small", vocab_size=50257)) == 124_439_808
    # nanoGPT reports the count without position embeddings: 123.69M.
    assert param_count(config, non_embedding=True) == expected - T * C
    # Untied, the LM head adds a vocab x embed matrix; wte is then lookup-only.
    untied = GPTConfig.preset("small", tie_weights=False)
    assert param_count(untied) == expected + V * C
    assert param_count(untied, non_embedding=True) == expected - T * C


def test_flops_per_token():
    config = GPTConfig.preset("small")
    n = param_count(config, non_embedding=True)
    assert flops_per_token(config) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(config, seq_len=256) == 6 * n + 12 * 12 * 12 * 64 * 256


def test_gpt_is_causal(tiny, tokens):
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 64)
    before, after = _forward(tiny, tokens), _forward(tiny, changed)
    np.testing.assert_array_equal(before[:, :10], after[:, :10])
    assert not np.allclose(before[:, 10:], after[:, 10:])


def test_gpt_initial_loss_is_log_vocab(tiny, tokens):
    batch = {"x": tokens, "y": jnp.roll(tokens, -1, axis=1)}
    loss, metrics = _loss(tiny, batch, None)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - math.log(64)) < 0.1
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_scan_over_layers_equals_python_loop(tiny, tokens):

    @jax.jit
    def unrolled(model, tokens):
        h = model.embed(tokens)
        for i in range(model.config.n_layer):
            h = apply_block(jax.tree.map(lambda a, i=i: a[i], model.blocks), h)
        return model.head(h)

    np.testing.assert_allclose(
        unrolled(tiny, tokens), _forward(tiny, tokens), rtol=1e-6, atol=1e-6
    )


def test_one_hot_cross_entropy_matches_optax(getkey):
    logits = 3.0 * jax.random.normal(getkey(), (4, 7, 50))
    labels = jax.random.randint(getkey(), (4, 7), 0, 50)

    @jax.jit
    def run(logits, labels):
        expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        ours = cross_entropy(logits, labels)
        half = cross_entropy(logits.astype(jnp.bfloat16), labels)
        # Negative labels are ignored, like nanoGPT's ignore_index=-1.
        masked, _ = loss_from_logits(logits, labels.at[:, 3:].set(-1))
        return expected, ours, half, masked

    expected, ours, half, masked = run(logits, labels)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    # bf16 logits are upcast: the loss is computed in float32.
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(masked, expected[:, :3].mean(), rtol=1e-6)


def test_sgd_steps_reduce_loss(tiny, tokens):
    batch = {"x": tokens, "y": jnp.roll(tokens, -1, axis=1)}
    params, static = eqx.partition(tiny, eqx.is_array)
    optimizer = optax.sgd(0.3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return gpt_loss(eqx.combine(p, static), batch, None)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(10):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert abs(losses[0] - math.log(64)) < 0.1, losses
    # Measured: 4.17 -> 1.23 over 10 steps memorising this one batch.
    assert losses[-1] < 2.0, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_dropout_needs_a_key(getkey, tokens):
    model = GPT(GPTConfig.preset("tiny", dropout=0.5), key=getkey())

    @jax.jit
    def run(model, tokens, key, other_key):
        return (
            model(tokens),
            model(tokens, key=key),
            model(tokens, key=key),
            model(tokens, key=other_key),
        )

    plain, dropped, again, other = run(model, tokens, getkey(), getkey())
    np.testing.assert_array_equal(dropped, again)
    assert not np.allclose(dropped, plain)
    assert not np.allclose(dropped, other)


def test_bf16_compute_keeps_float32_loss(tiny, tokens):
    batch = {"x": tokens, "y": jnp.roll(tokens, -1, axis=1)}
    half = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, tiny
    )
    logits16, loss16 = _forward_and_loss(half, batch)
    assert logits16.dtype == jnp.bfloat16
    loss32 = _loss(tiny, batch, None)[0]
    assert loss16.dtype == jnp.float32
    assert abs(float(loss16) - float(loss32)) < 0.02


def test_generate(getkey, tiny, tokens):
    prompt = tokens[:, :15]
    # top_k=1 sampling is greedy: both must match a plain loop that crops the
    # context to block_size (16) each step, as nanoGPT does.
    top1 = generate(tiny, prompt, 3, getkey(), top_k=1)
    assert top1.shape == (2, 18) and top1.dtype == prompt.dtype
    greedy = generate(tiny, prompt, 3, getkey(), temperature=0.0)
    seq = prompt
    for _ in range(3):
        logits = _forward(tiny, seq[:, -16:])
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(greedy, seq)
    np.testing.assert_array_equal(top1, seq)


def test_every_gpt_weight_names_its_logical_axes():
    model = _abstract_tiny(bias=True)
    for cls, module, extra in [(GPT, model, 0), (Block, model.blocks, 1)]:
        for field in typing.get_type_hints(cls):
            value = getattr(module, field)
            if not isinstance(value, jax.ShapeDtypeStruct):
                continue
            dims = _dims(cls, field)
            assert dims is not None, f"{cls.__name__}.{field} has no dims"
            # Stacked blocks carry a leading layers dim the annotation leaves out.
            assert len(dims) + extra == value.ndim, (cls.__name__, field, dims)
    assert _dims(Block, "w_qkv") == ("embed", "heads", "3", "head_dim")
    assert _dims(Block, "w_attn_out") == ("heads", "head_dim", "embed")
    assert _dims(GPT, "wte") == ("vocab", "embed")
    assert _dims(GPT, "lm_head") == ("embed", "vocab")


def test_models_know_nothing_of_meshes():
    # Plans (e.g. gpt_plans.py) live beside the models and may name mesh axes.
    root = Path(__file__).resolve().parents[1] / "models"
    for name in ["__init__.py", "mlp.py", "cnn.py", "gpt.py", "gpt2.py", "llama.py"]:
        path = root / name
        source = path.read_text()
        for banned in ["jax.sharding", "shard_map", "with_sharding_constraint"]:
            assert banned not in source, (path.name, banned)
        for axis in ['"data"', '"model"', '"pipe"']:
            assert axis not in source, (path.name, axis)


def test_config_validation():
    with pytest.raises(ValueError, match="Unknown GPT preset"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="`n_head` must divide `n_embd`"):
        GPTConfig(n_embd=30, n_head=4)
    assert GPTConfig.preset("baby") == GPTConfig()
    assert GPTConfig.preset("baby", dropout=0.1).dropout == 0.1


def _reference_layer_norm(x, scale, bias, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(jnp.var(x, axis=-1, keepdims=True) + eps) * scale
    return y if bias is None else y + bias


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_layer_norm_gradient_is_autodiffs(with_bias):
    # `_layer_norm`'s closed-form backward against autodiff through the formula,
    # on a stream with a large mean (where a careless form loses digits).
    from models.gpt import _layer_norm

    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 + rng.standard_normal((2, 5, 32)), jnp.float32)
    scale = jnp.asarray(rng.standard_normal(32), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(32), jnp.float32) if with_bias else None
    cotangent = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)

    def grads(norm):
        def objective(x, scale, bias):
            return jnp.sum(norm(x, scale, bias) * cotangent)

        return jax.grad(objective, argnums=(0, 1, 2))(x, scale, bias)

    ours, ref = grads(_layer_norm), grads(_reference_layer_norm)
    assert (ours[2] is None) == (not with_bias)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(
        _layer_norm(x, scale, bias), _reference_layer_norm(x, scale, bias), atol=1e-5
    )
    # bf16 activations: statistics in float32, the result and dx in bf16.
    half = x.astype(jnp.bfloat16)
    dx = jax.grad(lambda h: jnp.sum(_layer_norm(h, scale, bias).astype(jnp.float32)))(
        half
    )
    assert _layer_norm(half, scale, bias).dtype == dx.dtype == jnp.bfloat16


def test_layer_loop_and_remat_variants_compute_the_same(tokens):
    # Unrolled (the default), scanned, scanned two of three layers at a time (a
    # remainder), rematerialised, attention written out and through
    # `jax.nn.dot_product_attention`: the same loss and gradients. On the CPU the
    # default writes attention out and gives its projections a custom gradient
    # (`_matmul`); remat turns that gradient off, "xla" the written-out attention.
    base = GPTConfig.preset("tiny", n_layer=3)
    variants = [
        dict(unroll=True),
        dict(unroll=False),
        dict(unroll=2),
        dict(unroll=False, remat="full"),
        dict(unroll=True, remat="dots_no_batch"),
        dict(attention="explicit"),  # einsums instead of dot_product_attention
        dict(attention="xla"),
    ]
    weights = jax.tree.leaves(GPT(base, key=jax.random.key(3)))

    def variant(overrides):
        config = GPTConfig.preset("tiny", n_layer=3, **overrides)
        abstract = eqx.filter_eval_shape(
            lambda k: GPT(config, key=k), jax.random.key(0)
        )
        return eqx.tree_at(lambda m: jax.tree.leaves(m), abstract, weights)

    models = [variant(v) for v in variants]
    batch = {"x": tokens, "y": jnp.roll(tokens, -1, axis=1)}

    @jax.jit
    def all_grads(models):
        return [
            jax.value_and_grad(lambda m: gpt_loss(m, batch, None)[0])(m) for m in models
        ]

    results = all_grads(models)
    (ref_loss, ref_grads), rest = results[0], results[1:]
    assert models[1].config.unroll is False and models[3].config.remat == "full"
    for variant, (loss, grads) in zip(variants[1:], rest, strict=True):
        assert abs(float(loss) - float(ref_loss)) <= 1e-6, variant
        for a, b in zip(
            jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=str(variant))
    with pytest.raises(ValueError, match="`remat` must be one of"):
        GPTConfig(remat="some")
    # The default: shallow stacks unrolled, deep ones scanned.
    assert GPTConfig.preset("baby").layer_unroll is True  # 4 layers
    assert GPTConfig.preset("small").layer_unroll is False  # 12 layers
    assert GPTConfig.preset("small", unroll=3).layer_unroll == 3
