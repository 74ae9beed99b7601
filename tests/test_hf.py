"""Hugging Face interop: fixtures made by HF's own classes, round trips, sharded loads.

The fixtures in tests/fixtures/hf were written by `tools/make_hf_fixtures.py` with
`transformers` (`GPT2LMHeadModel`, `LlamaForCausalLM`, random weights) together with
the HF logits on fixed tokens (`reference.safetensors`). No torch is needed here.
"""

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file

import titanax as tx
from models import gpt_plans, llama_plans
from models.gpt import GPT, GPTConfig
from models.hf import TensorView, load_hf, save_hf
from models.llama import Llama

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ["gpt2", "llama", "llama3"]


@jax.jit
def _logits(model, tokens):
    return model(tokens)


def _reference(name):
    ref = load_file(str(FIXTURES / name / "reference.safetensors"))
    return ref["tokens"], ref["logits"]


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _hf_tensors(directory):
    out = {}
    for path in sorted(Path(directory).glob("model*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def loaded():
    return {name: load_hf(FIXTURES / name) for name in NAMES}


# ----------------------------------------------------------------------------
# Parity with Hugging Face


@pytest.mark.parametrize("name", NAMES)
def test_fixture_logits_match_hugging_face(loaded, name):
    model = loaded[name]
    assert isinstance(model, GPT if name == "gpt2" else Llama)
    tokens, want = _reference(name)
    got = _logits(model, tokens)
    assert got.shape == want.shape == (*tokens.shape, model.config.vocab_size)
    # Measured ~1e-6: float32 rounding only.
    assert _rel_err(got, want) <= 1e-4


def test_configs_are_read_from_config_json(loaded):
    gpt2, llama, llama3 = loaded["gpt2"], loaded["llama"], loaded["llama3"]
    assert gpt2.config == GPTConfig(
        vocab_size=64,
        block_size=16,
        n_layer=2,
        n_head=4,
        n_embd=32,
        dropout=0.1,
        bias=True,
        tie_weights=True,
    )
    assert gpt2.lm_head is None and gpt2.blocks.w_qkv.shape == (2, 32, 4, 3, 8)
    assert (llama.config.n_head, llama.config.n_kv_head) == (8, 4)
    assert llama.blocks.wk.shape == (2, 32, 4, 4) and llama.lm_head is not None
    c3 = llama3.config
    assert c3.tie_weights and c3.attention_bias and c3.mlp_bias
    assert dict(c3.rope_scaling or ()) == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8.0,
    }
    assert c3.rope_theta == 500000.0


# ----------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_roundtrips_bitwise(loaded, name, tmp_path):
    model = loaded[name]
    # Small shards: every model spreads over several files and an index.
    files = save_hf(model, tmp_path, max_shard_bytes=10_000)
    again = load_hf(tmp_path)
    assert again.config == model.config
    leaves, treedef = jax.tree.flatten(model)
    leaves2, treedef2 = jax.tree.flatten(again)
    assert treedef == treedef2
    for a, b in zip(leaves, leaves2, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The files hold exactly the Hugging Face tensors they were loaded from.
    want, got = _hf_tensors(FIXTURES / name), _hf_tensors(tmp_path)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert len(files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert {f.name for f in files} == set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in want.values())


def test_bias_free_gpt_saves_zero_biases(tmp_path):
    model = GPT(GPTConfig.preset("tiny"), key=jax.random.key(0))  # no biases, untied
    [path] = save_hf(model, tmp_path)
    assert path.name == "model.safetensors"
    tensors = load_file(str(path))
    assert tensors["transformer.h.1.attn.c_attn.bias"].shape == (96,)
    assert not np.any(tensors["transformer.h.1.attn.c_attn.bias"])
    np.testing.assert_array_equal(
        tensors["lm_head.weight"], np.asarray(model.lm_head).T
    )
    again = load_hf(tmp_path)  # GPT-2 always has biases: here zeros
    assert again.config.bias and not again.config.tie_weights
    tokens = np.arange(32).reshape(2, 16) % 64
    np.testing.assert_allclose(
        _logits(again, tokens), _logits(model, tokens), rtol=1e-6, atol=1e-6
    )


# ----------------------------------------------------------------------------
# Loading straight into a plan's shardings


@pytest.mark.parametrize(
    "name,plans", [("gpt2", gpt_plans), ("llama", llama_plans)], ids=["gpt2", "llama"]
)
def test_load_under_dp2_tp4_places_every_weight(loaded, name, plans):
    mesh = tx.make_mesh(jax.devices()[:8], data=2, model=4)
    plan = plans.dp_tp()
    model = load_hf(FIXTURES / name, plan, mesh)
    want = tx.shardings(model, plan, mesh)
    for (path, array), sharding in zip(
        jax.tree_util.tree_flatten_with_path(model)[0],
        jax.tree.leaves(want),
        strict=True,
    ):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), path
    # The TP-split weights hold a quarter of their heads per device.
    if name == "gpt2":
        w = model.blocks.w_qkv  # (layers, embed, heads, 3, head_dim)
        assert w.sharding.spec == PartitionSpec(None, None, "model", None, None)
        assert w.addressable_shards[0].data.shape == (2, 32, 1, 3, 8)
    else:
        assert model.blocks.wk.addressable_shards[0].data.shape == (2, 32, 1, 4)
        assert model.embed.sharding.spec == PartitionSpec("model", None)
    # Every shard holds the same numbers as the unsharded load.
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(loaded[name]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, ref = _reference(name)
    batch_sharding = NamedSharding(mesh, plan.batch_spec(2))  # rows over `data`
    got = _logits(model, jax.device_put(tokens, batch_sharding))
    assert _rel_err(got, ref) <= 1e-4
    np.testing.assert_allclose(got, _logits(loaded[name], tokens), rtol=0, atol=1e-5)


def test_a_shard_reads_only_its_slice():
    # GPT-2's c_attn (C, 3C) as w_qkv (layers, C, heads, 3, head_dim): a TP shard of
    # heads is three column runs of each layer's tensor; nothing else is read.
    L, C, nh, hs = 2, 8, 4, 2
    view = TensorView(
        "blocks.w_qkv", "h.{}.c_attn", (0, 1), ((C,), (3, nh, hs)), L, (0, 2, 1, 3)
    )
    rng = np.random.default_rng(0)
    hf = {f"h.{i}.c_attn": rng.standard_normal((C, 3 * C)) for i in range(L)}
    full = view.read((slice(None),) * 5, lambda n, s: hf[n][s])
    assert full.shape == view.shape == (L, C, nh, 3, hs)
    np.testing.assert_array_equal(view.to_hf(full)["h.1.c_attn"], hf["h.1.c_attn"])
    # HF column j = s * C + h * hs + d.
    np.testing.assert_array_equal(full[1, 5, 2, 1, 0], hf["h.1.c_attn"][5, C + 2 * hs])
    reads = []

    def get(name, index):
        block = hf[name][index]
        reads.append(block.size)
        return block

    for h in range(nh):
        index = (slice(None), slice(0, C), slice(h, h + 1), slice(None), slice(None))
        block = view.read(index, get)
        np.testing.assert_array_equal(block, full[index])
    assert sum(reads) == full.size  # each element read once over all shards
    assert len(reads) == nh * L * 3  # one run per (shard, layer, q/k/v)


# ----------------------------------------------------------------------------
# Bad input


def test_bad_directories_raise_checkpoint_errors(tmp_path):
    with pytest.raises(
        tx.CheckpointError, match="Expected a Hugging Face `config.json`"
    ):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(tx.CheckpointError, match="`model_type` to be one of") as e:
        load_hf(tmp_path)
    assert e.value.suggestion and "GPT-2 or Llama" in e.value.suggestion
    shutil.copy(FIXTURES / "gpt2" / "config.json", tmp_path / "config.json")
    with pytest.raises(tx.CheckpointError, match="Expected `model.safetensors` or"):
        load_hf(tmp_path)


def test_config_and_weights_that_disagree(tmp_path):
    shutil.copytree(FIXTURES / "gpt2", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(tx.CheckpointError, match=r"tensor `transformer\.h\.2\.ln_1"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(
        tx.CheckpointError,
        match=r"`transformer\.wte\.weight` of shape \(64, 64\) .*got \(64, 32\)",
    ):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "activation_function": "relu"})
    )
    with pytest.raises(tx.CheckpointError, match="`activation_function` in"):
        load_hf(tmp_path)
    with pytest.raises(tx.PlanError, match="both `plan` and `mesh`"):
        load_hf(FIXTURES / "gpt2", gpt_plans.tp())
    with pytest.raises(tx.CheckpointError, match="Expected a `models.gpt.GPT`"):
        save_hf(eqx.nn.Linear(2, 2, key=jax.random.key(0)), tmp_path)
