"""A multi-layer perceptron classifier whose weights name their logical axes.

Every weight is stored `(fan_in, fan_out)` and annotated with logical dims: the input
features are `in`, the classes `out`, and the hidden dims alternate `mlp`, `embed`,
`mlp`, ... With a plan that maps `mlp` to a mesh axis (Megatron tensor parallelism),
the layers alternate column-parallel (`(embed|in, mlp)`: output sharded, no
communication) and row-parallel (`(mlp, embed|out)`: one all-reduce), so each pair of
layers costs one all-reduce in the forward pass. The model knows nothing of meshes.
"""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
}


class Dense(eqx.Module):
    """An affine layer `x @ weight + bias` on a batch; `weight` is `(fan_in, fan_out)`.

    The subclasses below only re-annotate `weight` and `bias` with logical dims; an
    annotation belongs to a class, so each pair of dim names is its own small class.

    **Arguments:**

    - `in_size`: input features.
    - `out_size`: output features.
    - `key`: a PRNG key for the initial weights.
    """

    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, "fan_out"]

    def __init__(self, in_size: int, out_size: int, *, key: PRNGKeyArray):
        # PyTorch's and Equinox's Linear init: uniform in +-1/sqrt(fan_in).
        lim = 1.0 / in_size**0.5
        k_w, k_b = jax.random.split(key)
        self.weight = jax.random.uniform(
            k_w, (in_size, out_size), minval=-lim, maxval=lim
        )
        self.bias = jax.random.uniform(k_b, (out_size,), minval=-lim, maxval=lim)

    def __call__(self, x: Float[Array, "B fan_in"]) -> Float[Array, "B fan_out"]:
        return x @ self.weight + self.bias


class _InToMlp(Dense):
    weight: Float[Array, "in mlp"]
    bias: Float[Array, "mlp"]


class _MlpToEmbed(Dense):
    weight: Float[Array, "mlp embed"]
    bias: Float[Array, "embed"]


class _EmbedToMlp(Dense):
    weight: Float[Array, "embed mlp"]
    bias: Float[Array, "mlp"]


class _MlpToOut(Dense):
    weight: Float[Array, "mlp out"]
    bias: Float[Array, "out"]


class _EmbedToOut(Dense):
    weight: Float[Array, "embed out"]
    bias: Float[Array, "out"]


class _InToOut(Dense):
    weight: Float[Array, "in out"]
    bias: Float[Array, "out"]


# Which class holds a weight from one logical dim to the next.
_DENSE: dict[tuple[str, str], type[Dense]] = {
    ("in", "mlp"): _InToMlp,
    ("mlp", "embed"): _MlpToEmbed,
    ("embed", "mlp"): _EmbedToMlp,
    ("mlp", "out"): _MlpToOut,
    ("embed", "out"): _EmbedToOut,
    ("in", "out"): _InToOut,
}


class MLP(eqx.Module):
    """A feed-forward classifier: `in_size -> *hidden_sizes -> out_size` logits.

    Hidden layer `i` has logical dim `mlp` for even `i` and `embed` for odd `i`, so a
    tensor-parallel plan shards every other hidden activation (see the module doc).

    **Arguments:**

    - `in_size`: input features; inputs of more dims are flattened after the batch dim.
    - `out_size`: number of classes.
    - `hidden_sizes`: width of each hidden layer; `()` gives a linear model.
    - `activation`: `"gelu"` or `"relu"`, applied after every hidden layer.
    - `key`: a PRNG key for the initial weights.
    """

    layers: tuple[Dense, ...]
    activation: str = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden_sizes: Sequence[int] = (128,),
        activation: str = "gelu",
        *,
        key: PRNGKeyArray,
    ):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(_ACTIVATIONS)}, "
                f"got {activation!r}."
            )
        sizes = [in_size, *hidden_sizes, out_size]
        names = ["in"] + [("mlp", "embed")[i % 2] for i in range(len(hidden_sizes))]
        names.append("out")
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            _DENSE[names[i], names[i + 1]](sizes[i], sizes[i + 1], key=keys[i])
            for i in range(len(sizes) - 1)
        )
        self.activation = activation

    def __call__(
        self, x: Float[Array, "B ..."], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "B out"]:
        """Logits for a batch.

        **Arguments:**

        - `x`: inputs `(batch, in_size)`, or `(batch, ...)` flattening to `in_size`.
        - `key`: unused (no dropout); accepted so all models share one signature.

        **Returns:**

        Logits `(batch, out_size)`.
        """
        del key
        act = _ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)  # (B, in_size)
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)


def cross_entropy_loss(
    model: Callable[..., Array],
    batch: dict[str, Array],
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Mean softmax cross-entropy of a classifier, in the Titanax `loss` signature.

    **Arguments:**

    - `model`: a classifier called as `model(x, key=key)`, returning logits `(B, C)`
        (`MLP`, `models.cnn.CNN`).
    - `batch`: `{"x": float (B, ...), "y": int (B,)}`.
    - `key`: passed to the model, or `None`.

    **Returns:**

    `(loss, {"accuracy": accuracy})`, float32 scalars.
    """
    logits = model(batch["x"], key=key).astype(jnp.float32)
    labels = batch["y"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return loss, {"accuracy": accuracy}
