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


def _tiny(getkey, **overrides):
    return GPT(GPTConfig.preset("tiny", **overrides), key=getkey())


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
    assert model(x).shape == (5, 10)
    assert model(x.reshape(5, 64)).shape == (5, 10)
    batch = {"x": x, "y": jnp.arange(5)}
    loss, metrics = cross_entropy_loss(model, batch, None)
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
    linear = MLP(4, 3, (), key=getkey())
    assert _dims(type(linear.layers[0]), "weight") == ("in", "out")
    with pytest.raises(ValueError, match="`activation`"):
        MLP(4, 3, activation="tanh", key=getkey())


# ---------------------------------------------------------------------------- CNN


def test_cnn_forward_and_loss(getkey):
    model = CNN(10, channels=(8, 16), key=getkey())
    x = jax.random.normal(getkey(), (3, 8, 8))
    logits = model(x)
    assert logits.shape == (3, 10)
    np.testing.assert_allclose(model(x[:, None]), logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model(x.reshape(3, 64)), logits, rtol=1e-6, atol=1e-6)
    assert model(jnp.zeros((2, 1, 28, 28))).shape == (2, 10)
    loss, metrics = cnn_loss(model, {"x": x, "y": jnp.array([0, 1, 2])}, None)
    assert jnp.isfinite(loss) and "accuracy" in metrics
    assert _dims(CNN, "w_head") == ("channels", "out")


# ---------------------------------------------------------------------------- GPT


def test_gpt_forward_shapes(getkey):
    model = _tiny(getkey)
    tokens = _tokens(getkey(), (3, 16))
    assert model(tokens).shape == (3, 16, 64)
    assert model(tokens[:, :5]).shape == (3, 5, 64)
    # The pipeline's pieces compose to the whole model.
    h = model.embed(tokens)
    assert h.shape == (3, 16, 32)
    np.testing.assert_array_equal(
        model.head(run_blocks(model.blocks, h)), model(tokens)
    )
    with pytest.raises(AssertionError, match="block size is only 16"):
        model(_tokens(getkey(), (1, 17)))


def test_gpt_tied_and_bias(getkey):
    model = _tiny(getkey, tie_weights=True, bias=True)
    assert model.lm_head is None and model.blocks.b_qkv is not None
    assert model(_tokens(getkey(), (2, 8))).shape == (2, 8, 64)
    untied = _tiny(getkey)
    assert param_count(untied) - param_count(model) == 32 * 64 - (
        2 * (32 + 3 * 32 + 32 + 32 + 4 * 32 + 32) + 32  # biases: 2 blocks + final LN
    )


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


def test_gpt_is_causal(getkey):
    model = _tiny(getkey)
    tokens = _tokens(getkey(), (2, 16))
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 64)
    before, after = model(tokens), model(changed)
    np.testing.assert_array_equal(before[:, :10], after[:, :10])
    assert not np.allclose(before[:, 10:], after[:, 10:])


def test_gpt_initial_loss_is_log_vocab(getkey):
    model = _tiny(getkey)
    tokens = _tokens(getkey(), (8, 17))
    loss, metrics = gpt_loss(model, {"x": tokens[:, :-1], "y": tokens[:, 1:]}, None)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - math.log(64)) < 0.1
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_scan_over_layers_equals_python_loop(getkey):
    model = _tiny(getkey, n_layer=3)
    tokens = _tokens(getkey(), (2, 16))
    h = model.embed(tokens)
    for i in range(model.config.n_layer):
        h = apply_block(jax.tree.map(lambda a, i=i: a[i], model.blocks), h)
    np.testing.assert_allclose(model.head(h), model(tokens), rtol=1e-6, atol=1e-6)


def test_one_hot_cross_entropy_matches_optax(getkey):
    logits = 3.0 * jax.random.normal(getkey(), (4, 7, 50))
    labels = jax.random.randint(getkey(), (4, 7), 0, 50)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(cross_entropy(logits, labels), expected, atol=1e-6)
    # bf16 logits are upcast: the loss is computed in float32.
    assert cross_entropy(logits.astype(jnp.bfloat16), labels).dtype == jnp.float32
    # Negative labels are ignored, like nanoGPT's ignore_index=-1.
    masked = labels.at[:, 3:].set(-1)
    loss, _ = loss_from_logits(logits, masked)
    np.testing.assert_allclose(loss, expected[:, :3].mean(), rtol=1e-6)


def test_sgd_steps_reduce_loss(getkey):
    model = _tiny(getkey)
    tokens = _tokens(getkey(), (4, 17))
    batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.sgd(1.0)
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
    assert losses[0] > 4.0
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_dropout_needs_a_key(getkey):
    model = _tiny(getkey, dropout=0.5)
    tokens = _tokens(getkey(), (2, 16))
    np.testing.assert_array_equal(model(tokens), model(tokens))
    key = getkey()
    np.testing.assert_array_equal(model(tokens, key=key), model(tokens, key=key))
    assert not np.allclose(model(tokens, key=key), model(tokens))


def test_bf16_compute_keeps_float32_loss(getkey):
    model = _tiny(getkey)
    tokens = _tokens(getkey(), (2, 17))
    batch = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    half = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, model
    )
    assert half(batch["x"]).dtype == jnp.bfloat16
    loss16, _ = gpt_loss(half, batch, None)
    loss32, _ = gpt_loss(model, batch, None)
    assert loss16.dtype == jnp.float32
    assert abs(float(loss16) - float(loss32)) < 0.02


def test_generate(getkey):
    model = _tiny(getkey)
    prompt = _tokens(getkey(), (2, 10))
    out = generate(model, prompt, 10, getkey(), top_k=5)
    assert out.shape == (2, 20) and out.dtype == prompt.dtype
    np.testing.assert_array_equal(out[:, :10], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 64
    # Greedy decoding matches a plain loop that crops to block_size (16) each step.
    greedy = generate(model, prompt, 10, getkey(), temperature=0.0)
    seq = prompt
    for _ in range(10):
        logits = model(seq[:, -16:])
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    np.testing.assert_array_equal(greedy, seq)


def test_every_gpt_weight_names_its_logical_axes(getkey):
    model = _tiny(getkey, bias=True)
    for cls, module, extra in [(GPT, model, 0), (Block, model.blocks, 1)]:
        for field in typing.get_type_hints(cls):
            value = getattr(module, field)
            if not eqx.is_array(value):
                continue
            dims = _dims(cls, field)
            assert dims is not None, f"{cls.__name__}.{field} has no dims"
            # Stacked blocks carry a leading layers dim the annotation leaves out.
            assert len(dims) + extra == value.ndim, (cls.__name__, field, dims)
    assert _dims(Block, "w_qkv") == ("embed", "3", "heads", "head_dim")
    assert _dims(Block, "w_attn_out") == ("heads", "head_dim", "embed")
    assert _dims(GPT, "wte") == ("vocab", "embed")
    assert _dims(GPT, "lm_head") == ("embed", "vocab")


def test_models_know_nothing_of_meshes():
    root = Path(__file__).resolve().parents[1] / "models"
    for path in root.glob("*.py"):
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
