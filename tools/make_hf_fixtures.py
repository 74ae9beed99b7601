"""Make the Hugging Face parity fixtures in tests/fixtures/hf, and check exports.

Needs `torch` and `transformers` (never a dependency of Titanax; not run in CI). With
a separate virtualenv:

    python3 -m venv /tmp/hf
    /tmp/hf/bin/pip install torch transformers safetensors numpy
    /tmp/hf/bin/python tools/make_hf_fixtures.py --titanax-python .venv/bin/python

It builds small random models with Hugging Face's own classes (`GPT2LMHeadModel`,
`LlamaForCausalLM`; no hub download), every weight drawn at random (norm scales near
1, biases nonzero, so a mis-mapped tensor shows in the logits), saves each with
`save_pretrained(safe_serialization=True)` and records its logits on fixed tokens in
`reference.safetensors` (`tokens` int32 (B, T), `logits` float32 (B, T, V)).

Then the other direction: the Titanax interpreter (`--titanax-python`, which has
jax but no torch) runs this file with `--export`: it loads each fixture with
`models.hf.load_hf`, saves it again with `models.hf.save_hf`, and also saves
freshly initialised Titanax models (an untied bias-free GPT, a tied Llama) with their
Titanax logits. This process loads every export with `from_pretrained` and checks the
logits match. It prints one line per check and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
TOKENS_SHAPE = (2, 16)
TOLERANCE = 1e-4  # relative to the largest |logit|

# name -> (Hugging Face class, config kwargs, save_pretrained kwargs)
SPECS = {
    # GPT-2 as released: tied head, biases, GELU-tanh; 4 heads so TP=4 splits them.
    "gpt2": (
        "GPT2",
        dict(
            vocab_size=64,
            n_positions=16,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=None,
            eos_token_id=None,
        ),
        {},
    ),
    # Grouped-query attention (8 query heads, 4 kv heads), untied, saved in three
    # shards with an index file.
    "llama": (
        "Llama",
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=32,
        ),
        {"max_shard_size": "40KB"},
    ),
    # Llama 3 RoPE scaling, tied embeddings, attention and MLP biases.
    "llama3": (
        "Llama",
        dict(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
        ),
        {},
    ),
}


def _tokens(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, TOKENS_SHAPE).astype(np.int32)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------
# Hugging Face side (torch)


def _hf_model(kind: str, kwargs: dict):
    import transformers as tr

    config = getattr(tr, f"{kind}Config")(**kwargs)
    return getattr(
        tr, f"{kind}LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM"
    )(config).eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(tokens.astype(np.int64)))
    return out.logits.float().numpy()


def make_fixture(name: str) -> None:
    import torch

    kind, kwargs, save_kwargs = SPECS[name]
    torch.manual_seed(sum(map(ord, name)))
    model = _hf_model(kind, kwargs)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            scale = "norm" in pname or pname.split(".")[-2].startswith("ln_")
            is_norm_scale = scale and pname.endswith("weight")
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p)
                if is_norm_scale
                else 0.2 * torch.randn_like(p)
            )
    out = FIXTURES / name
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    (out / "generation_config.json").unlink(missing_ok=True)
    tokens = _tokens(kwargs["vocab_size"])
    logits = _hf_logits(model, tokens)
    save_file({"tokens": tokens, "logits": logits}, out / "reference.safetensors")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"fixture {name}: {sorted(f.name for f in out.iterdir())}, {size:,} bytes")


def check_export(directory: Path, kind: str) -> float:
    """Load a Titanax export with `from_pretrained`; its logits vs Titanax's."""
    import transformers as tr

    cls = tr.GPT2LMHeadModel if kind == "gpt2" else tr.LlamaForCausalLM
    model = cls.from_pretrained(directory).eval()
    ref = load_file(str(directory / "reference.safetensors"))
    return _rel_err(_hf_logits(model, ref["tokens"]), ref["logits"])


# ----------------------------------------------------------------------------
# Titanax side (jax), run with --export under the Titanax interpreter


def export(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from models.gpt import GPT, GPTConfig
    from models.hf import load_hf, save_hf
    from models.llama import Llama, LlamaConfig

    def save_with_logits(model, directory: Path, vocab: int, **kwargs):
        save_hf(model, directory, **kwargs)
        tokens = _tokens(vocab, seed=1)
        logits = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
        save_file(
            {"tokens": tokens, "logits": logits}, directory / "reference.safetensors"
        )

    manifest = {}
    for name, (kind, _, _) in SPECS.items():
        model = load_hf(FIXTURES / name)
        save_with_logits(model, out / f"roundtrip-{name}", model.config.vocab_size)
        manifest[f"roundtrip-{name}"] = "gpt2" if kind == "GPT2" else "llama"
    gpt = GPT(GPTConfig.preset("tiny", bias=False), key=jax.random.key(0))
    save_with_logits(gpt, out / "titanax-gpt", 64)
    llama = Llama(
        LlamaConfig.preset("tiny", tie_weights=True, n_kv_head=1), key=jax.random.key(1)
    )
    save_with_logits(llama, out / "titanax-llama", 64, max_shard_bytes=20_000)
    manifest.update({"titanax-gpt": "gpt2", "titanax-llama": "llama"})
    (out / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--titanax-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--export", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.export:
        export(Path(args.export))
        return
    for name in SPECS:
        make_fixture(name)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [args.titanax_python, __file__, "--export", tmp], check=True, cwd=ROOT
        )
        manifest = json.loads((Path(tmp) / "manifest.json").read_text())
        for name, kind in manifest.items():
            err = check_export(Path(tmp) / name, kind)
            ok = err <= TOLERANCE
            failed |= not ok
            print(f"export {name}: HF logits vs Titanax, max rel err {err:.2e} "
                  f"{'ok' if ok else 'MISMATCH'}")  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
