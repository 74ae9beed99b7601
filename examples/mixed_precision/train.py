"""The byte-level GPT in fp32, bf16 and fp16 (dynamic loss scaling), side by side.

Parameters and optimizer state stay float32 in all three ("master weights"); only the
model's compute runs in the lower precision (`tx.Precision`). fp16 multiplies the loss
by a scale before differentiating: a step whose gradients overflow is skipped and the
scale halves; after `growth_interval` good steps it doubles. Starting the scale far
too high (2^20) shows the whole mechanism in a few steps: overflows and halvings
first, then growth and the occasional overflow again.

    python examples/mixed_precision/train.py              # 8 CPU devices, ~1 min
    python examples/mixed_precision/train.py --steps 60

Prints one row per step (the three losses, fp16's loss scale and skipped steps) and
checks that bf16 and fp16 end within 0.15 of the fp32 loss.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `models/` lives at the repository root

import titanax as tx  # noqa: E402

tx.simulate_cpu_devices(8)

import jax  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "gpt_small_tp.yaml"


def train(compute: str, steps: int) -> dict[int, tuple[float, float, int]]:
    """`{step: (loss, loss scale, skipped steps so far)}` for one precision."""
    overrides = [
        f"steps={steps}",
        f"precision.compute={compute}",
        "precision.initial_scale=1048576",  # 2^20: too high on purpose
        "precision.growth_interval=8",
        "logging.every=1",
        "logging.console=none",
        "optimizer.schedule=constant",
    ]
    trace: dict[int, tuple[float, float, int]] = {}

    def record(step, metrics, trainer):
        state = trainer.state
        scale = 1.0 if state.loss_scale is None else float(state.loss_scale.scale)
        trace[step] = (metrics["loss"], scale, int(jax.device_get(state.bad_steps)))

    run = tx.config.build_run(tx.config.load_config(CONFIG, overrides), hooks=[record])
    run.trainer.fit(run.data.batches(0, run.plan, run.mesh), steps=steps)
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    runs = {c: train(c, args.steps) for c in ("fp32", "bf16", "fp16")}
    names = "  ".join(f"{c:>7}" for c in ("fp32", "bf16", "fp16"))
    print(f"{'step':>4}  {names}  {'fp16 scale':>10}  skipped")
    for step in sorted(runs["fp32"]):
        losses = [runs[c][step][0] for c in ("fp32", "bf16", "fp16")]
        _, scale, skipped = runs["fp16"][step]
        row = "  ".join(f"{x:7.4f}" for x in losses)
        print(f"{step:>4}  {row}  {scale:>10.0f}  {skipped:>7}")
    last = max(runs["fp32"])
    final = {c: runs[c][last][0] for c in runs}
    scales = [runs["fp16"][s][1] for s in sorted(runs["fp16"])]
    skipped = runs["fp16"][last][2]
    print(f"final losses: {final}; fp16 skipped {skipped} step(s)")
    assert skipped > 0 and min(scales) < 2**20, "the scale never had to come down"
    for c in ("bf16", "fp16"):
        assert abs(final[c] - final["fp32"]) < 0.15, (c, final)


if __name__ == "__main__":
    main()
