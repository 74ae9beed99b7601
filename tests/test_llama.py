"""The Llama decoder: shapes, causality, grouped-query attention, RoPE, logical axes,
and Trainer parity under DP, FSDP and DP x TP against one device (fp32, <= 1e-5)."""

import dataclasses
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import titanax as tx
from models import llama_plans
from models.llama import Llama, LlamaBlock, LlamaConfig, llama_loss, rope_frequencies

# 8 query heads over 4 kv heads, so TP=4 splits both; vocab and mlp divisible by 8.
CONFIG = LlamaConfig.preset("tiny", n_head=8, n_kv_head=4, n_embd=32, mlp_size=64)
dataclass_replace = dataclasses.replace


def _random_llama(config, seed=0):
    """Random weights drawn in numpy (no PRNG compilation); norm scales near 1."""
    abstract = eqx.filter_eval_shape(lambda k: Llama(config, key=k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    arrays = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        x = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        arrays.append(x + 1 if "norm" in jax.tree_util.keystr(path) else x)
    return eqx.tree_at(lambda m: jax.tree.leaves(m), abstract, arrays)


def _batch(config, rows, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, config.vocab_size, (rows, config.block_size + 1))
    w = w.astype(np.int32)
    return {"x": w[:, :-1], "y": w[:, 1:]}


@jax.jit
def _forward(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def llama():
    return _random_llama(CONFIG)


def test_forward_shapes_and_causality(llama):
    tokens = _batch(CONFIG, 2)["x"]
    logits = _forward(llama, tokens)
    assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
    changed = tokens.copy()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    after = _forward(llama, changed)
    np.testing.assert_array_equal(logits[:, :9], after[:, :9])
    assert not np.allclose(logits[:, 9:], after[:, 9:])
    with pytest.raises(AssertionError, match="block size is only 16"):
        jax.eval_shape(llama, jnp.zeros((1, 17), jnp.int32))


def _named_leaves(model):
    flat = jax.tree_util.tree_flatten_with_path(model)[0]
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def test_grouped_query_attention_equals_repeated_kv_heads(llama):
    # 4 kv heads serving 8 query heads = 8 kv heads, each of the 4 repeated twice
    # (kv head j serves query heads 2j and 2j + 1).
    full = dataclass_replace(CONFIG, n_kv_head=8)
    abstract = eqx.filter_eval_shape(lambda k: Llama(full, key=k), jax.random.key(0))
    leaves = [
        np.repeat(np.asarray(x), 2, axis=2)
        if name in (".blocks.wk", ".blocks.wv")
        else x
        for name, x in _named_leaves(llama)
    ]
    mha = eqx.tree_at(lambda m: jax.tree.leaves(m), abstract, leaves)
    tokens = _batch(CONFIG, 2)["x"]
    np.testing.assert_allclose(
        _forward(mha, tokens), _forward(llama, tokens), atol=1e-5
    )


def test_rope_frequencies():
    config = LlamaConfig.preset("tiny")  # head_dim 8
    np.testing.assert_allclose(
        rope_frequencies(config), 10000.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6
    )
    # Llama 3 scaling: wavelengths longer than original_context / low_freq_factor
    # are divided by `factor`; shorter than original_context / high_freq_factor kept.
    scaled = dataclass_replace(
        config,
        rope_scaling=(
            ("factor", 8.0),
            ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 64.0),
        ),
    )
    base, got = rope_frequencies(config), rope_frequencies(scaled)
    wavelen = 2 * np.pi / base  # 6.3, 63, 628, 6283
    assert got[0] == base[0]  # 6.3 < 64 / 4: kept
    np.testing.assert_allclose(got[2:], base[2:] / 8, rtol=1e-6)  # > 64: scaled
    smooth = (64 / wavelen[1] - 1) / 3  # 16 <= 63 <= 64: interpolated
    np.testing.assert_allclose(
        got[1], (1 - smooth) * base[1] / 8 + smooth * base[1], rtol=1e-6
    )
    with pytest.raises(ValueError, match="`rope_scaling` must name exactly"):
        dataclass_replace(config, rope_scaling=(("factor", 8.0),))
    with pytest.raises(ValueError, match="`n_kv_head` must divide `n_head`"):
        LlamaConfig(n_head=4, n_kv_head=3)


def test_every_llama_weight_names_its_logical_axes():
    config = dataclass_replace(CONFIG, attention_bias=True, mlp_bias=True)
    model = eqx.filter_eval_shape(lambda k: Llama(config, key=k), jax.random.key(0))
    specs = jax.tree.leaves(
        tx.logical_axes(model), is_leaf=lambda s: isinstance(s, PartitionSpec)
    )
    paths = [name for name, _ in _named_leaves(model)]
    named = dict(zip(paths, (tuple(s) for s in specs), strict=True))
    assert len(named) == 19  # 16 per block, embed, norm, lm_head
    assert named[".blocks.wk"] == ("layers", "embed", "kv_heads", "head_dim")
    assert named[".blocks.wo"] == ("layers", "heads", "head_dim", "embed")
    assert named[".blocks.w_down"] == ("layers", "mlp", "embed")
    assert named[".embed"] == ("vocab", "embed")
    assert all(all(n is not None for n in spec) for spec in named.values()), named
    hints = typing.get_type_hints(LlamaBlock)
    assert "kv_heads" in str(hints["wv"])


# ----------------------------------------------------------------------------
# Trainer parity: 3 AdamW steps under each layout equal one device's


LAYOUTS = {
    "dp8": (dict(data=8), llama_plans.dp()),
    "fsdp8": (dict(data=8), llama_plans.fsdp(min_size=64)),
    "dp2_tp4": (dict(data=2, model=4), llama_plans.dp_tp()),
}


def _train(model, batch, axes, plan):
    n = int(np.prod(list(axes.values())))
    mesh = tx.make_mesh(jax.devices()[:n], **axes)
    losses = []
    trainer = tx.Trainer(
        model,
        plan,
        optimizer=tx.optim.adamw(1e-2, weight_decay=0.1, clip_norm=1.0),
        loss=llama_loss,
        mesh=mesh,
        log_every=1,
        hooks=[lambda step, metrics, trainer: losses.append(metrics["loss"])],
    )
    state = trainer.fit([batch] * 3, steps=3)
    return losses, state.model


@pytest.fixture(scope="module")
def reference(llama):
    batch = _batch(CONFIG, 16, seed=1)
    return batch, _train(llama, batch, dict(data=1), tx.Plan())


def _l2_rel(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_parity_with_one_device(llama, reference, layout):
    batch, (ref_losses, ref_model) = reference
    axes, plan = LAYOUTS[layout]
    losses, model = _train(llama, batch, axes, plan)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[2] < ref_losses[0]  # it trains
    # The weights as a whole, in L2 (Adam turns rounding noise in near-zero
    # gradients into steps of up to lr, so single elements may differ more).
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(model)])
    ref = np.concatenate([np.ravel(x) for x in jax.tree.leaves(ref_model)])
    assert _l2_rel(flat, ref) <= 1e-5
    if "tp" in layout:
        assert model.blocks.wq.sharding.spec == PartitionSpec(None, None, "model", None)
    if "fsdp" in layout:
        assert "data" in tuple(model.blocks.w_up.sharding.spec)
