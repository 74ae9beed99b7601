"""The byte-level GPT in fp32, bf16 and fp16 (dynamic loss scaling), side by side.

Parameters and optimizer state stay float32 in all three ("master weights"); only the
model's compute runs in the lower precision (`tx.Precision`). fp16 multiplies the loss
by a scale before differentiating: a step whose gradients overflow is skipped and the
scale halves; after `growth_interval` good steps it doubles. Starting the scale far
too high (2^20) shows the whole mechanism in a few steps: overflows and halvings
first, then growth and the occasional overflow again.

    python examples/mixed_precision/train.py              # 8 CPU devices, ~1 min
    python examples/mixed_precision/train.py --steps 60

Prints one row per step (the three losses and fp16's loss scale after the step; a
step whose scale halved was skipped) and checks that bf16 tracks fp32 to 0.05 and
that fp16 after `N` steps of which `k` were skipped is within 0.15 of fp32 after
`N - k` updates.
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

CONFIG = ROOT / "examples" / "configs" / "gpt_small_tp.yaml"


def train(compute: str, steps: int) -> dict[int, tuple[float, float]]:
    """`{step: (loss, loss scale after the step)}` for one precision."""
    overrides = [
        f"steps={steps}",
        f"precision.compute={compute}",
        "precision.initial_scale=1048576",  # 2^20: too high on purpose
        "precision.growth_interval=8",
        "logging.every=1",
        "logging.console=none",
        "optimizer.schedule=constant",
    ]
    trace: dict[int, tuple[float, float]] = {}

    def record(step, metrics, trainer):
        scale = trainer.state.loss_scale
        trace[step] = (metrics["loss"], 1.0 if scale is None else float(scale.scale))

    run = tx.config.build_run(tx.config.load_config(CONFIG, overrides), hooks=[record])
    run.trainer.fit(run.data, steps=steps)
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    runs = {c: train(c, args.steps) for c in ("fp32", "bf16", "fp16")}
    names = "  ".join(f"{c:>7}" for c in ("fp32", "bf16", "fp16"))
    print(f"{'step':>4}  {names}  {'fp16 scale':>10}")
    previous = 2.0**20
    skipped = []
    for step in sorted(runs["fp32"]):
        losses = [runs[c][step][0] for c in ("fp32", "bf16", "fp16")]
        scale = runs["fp16"][step][1]
        row = "  ".join(f"{x:7.4f}" for x in losses)
        note = "  overflow: skipped, scale halved" if scale < previous else ""
        skipped += [step] if scale < previous else []
        print(f"{step:>4}  {row}  {scale:>10.0f}{note}")
        previous = scale
    last = max(runs["fp32"])
    final = {c: runs[c][last][0] for c in runs}
    print(f"final losses: {final}; fp16 skipped steps {skipped}")
    assert skipped, "the loss scale never had to come down"
    bf16_gap = max(abs(runs["bf16"][s][0] - runs["fp32"][s][0]) for s in runs["fp32"])
    assert bf16_gap < 0.05, bf16_gap
    updates = last - len(skipped)
    assert abs(final["fp16"] - runs["fp32"][updates][0]) < 0.15, (final, updates)


if __name__ == "__main__":
    main()
