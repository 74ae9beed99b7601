"""A small convolutional classifier for grayscale digits (8x8 or 28x28).

Convolutions are `eqx.nn.Conv2d`, whose logical axes come from Titanax's built-in
defaults for Equinox layers; the linear head is a plain array annotated with its
logical dims. The model knows nothing of meshes.
"""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

# The loss is the same for every classifier; re-exported so each model module offers it.
from .mlp import cross_entropy_loss as cross_entropy_loss


class CNN(eqx.Module):
    """Convolutions, global average pooling, then a linear head to class logits.

    The first convolution keeps the resolution; each later one halves it (stride 2),
    so `channels=(16, 32)` maps 8x8 digits to 4x4 maps and 28x28 digits to 14x14 before
    pooling.

    **Arguments:**

    - `out_size`: number of classes.
    - `channels`: output channels of each 3x3 convolution.
    - `key`: a PRNG key for the initial weights.
    """

    convs: tuple[eqx.nn.Conv2d, ...]
    w_head: Float[Array, "channels out"]
    b_head: Float[Array, "out"]

    def __init__(
        self,
        out_size: int = 10,
        channels: Sequence[int] = (16, 32),
        *,
        key: PRNGKeyArray,
    ):
        if len(channels) == 0:
            raise ValueError("`channels` needs at least one convolution, got ().")
        keys = jax.random.split(key, len(channels) + 1)
        in_channels = [1, *channels[:-1]]
        self.convs = tuple(
            eqx.nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, key=k)
            for i, (c_in, c_out, k) in enumerate(
                zip(in_channels, channels, keys[:-1], strict=True)
            )
        )
        lim = 1.0 / math.sqrt(channels[-1])
        k_w, k_b = jax.random.split(keys[-1])
        self.w_head = jax.random.uniform(
            k_w, (channels[-1], out_size), minval=-lim, maxval=lim
        )
        self.b_head = jax.random.uniform(k_b, (out_size,), minval=-lim, maxval=lim)

    def __call__(
        self, x: Float[Array, "B ..."], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B out"]:
        """Logits for a batch of square grayscale images.

        **Arguments:**

        - `x`: images `(B, H, W)` or `(B, 1, H, W)`, or flat `(B, H*W)` with `H == W`
            (e.g. scikit-learn's 8x8 digits as rows of 64).
        - `key`: unused (no dropout); accepted so all models share one signature.

        **Returns:**

        Logits `(batch, out_size)`.
        """
        del key
        B = x.shape[0]
        if x.ndim == 2:
            side = math.isqrt(x.shape[1])
            assert side * side == x.shape[1], (
                f"Flat images must be square, got {x.shape[1]} pixels per image"
            )
            x = x.reshape(B, side, side)  # (B, H, W)
        if x.ndim == 3:
            x = x[:, None]  # (B, 1, H, W)
        for conv in self.convs:
            # eqx.nn.Conv2d takes one image (C, H, W); vmap makes one batched conv.
            x = jax.nn.relu(jax.vmap(conv)(x))  # (B, C, H', W')
        x = jnp.mean(x, axis=(2, 3))  # (B, C)
        return x @ self.w_head + self.b_head
