"""`tx.Stage`: how a model's stacked layers become pipeline stages, mesh-free.

A pipelined model has three parts: the part before the stack (`pre`: embedding), the
stack of homogeneous layers (one module whose arrays carry a leading `layers` dim),
and the part after (`post`: final norm, head and loss). A `Stage` names those parts
with plain functions of the model, so model code needs no pipeline-specific edits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ..._errors import PipelineError

__all__ = ["Stage"]


def _call_layer(layer: Any, h: Any, key: Any) -> Any:
    return layer(h, key=key)


class Stage(eqx.Module):
    """The description of a pipeline stage: the stacked block and its boundaries.

    The stacked block is found in the model with `where` (as for `eqx.tree_at`); its
    `layers` dim of size `L` is split over the `pipe` axis into `S` stages of `L / S`
    consecutive layers. Each stage runs its layers with a `jax.lax.scan` of
    `layer_fn`. `pre` runs on stage 0 before the first layer and `post` on the last
    stage after the last layer; both see the model with its stacked block replaced by
    `None`, and both run per microbatch.

    **Arguments:**

    - `where`: `model -> stacked block`, e.g. `lambda m: m.blocks`.
    - `pre`: `(model, microbatch, key) -> h`, the boundary before the stack (e.g. the
        embedding). `h` is an array (or PyTree of arrays) of fixed shape.
    - `post`: `(model, h, microbatch, key) -> loss` or `-> (loss, metrics)`, the
        boundary after the stack: head and loss, a scalar mean over the microbatch.
    - `layer_fn`: `(layer, h, key) -> h`, one layer (the stacked block without its
        `layers` dim). Default: `layer(h, key=key)`.
    - `remat`: the rematerialisation policy of each layer in the backward pass.
        `False` keeps every activation; `True` recomputes the layer
        (`jax.checkpoint`), keeping only its input; a `jax.checkpoint_policies` policy
        (e.g. `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) keeps what
        it names. GPipe keeps every tick's activations, so this sets its memory;
        1F1B stashes stage inputs only and recomputes a stage's forward in its
        backward, where the policy applies to that recomputation's layers.

    `key` is `None` when the step runs without randomness (evaluation).

    !!! Example
        ```python
        from models.gpt import apply_block, loss_from_logits

        stage = tx.Stage(
            where=lambda m: m.blocks,
            pre=lambda m, b, key: m.embed(b["x"], key=key),
            post=lambda m, h, b, key: loss_from_logits(m.head(h), b["y"]),
            layer_fn=apply_block,
        )
        ```
    """

    where: Callable[[Any], Any] = eqx.field(static=True)
    pre: Callable[[Any, Any, Any], Any] = eqx.field(static=True)
    post: Callable[[Any, Any, Any, Any], Any] = eqx.field(static=True)
    layer_fn: Callable[[Any, Any, Any], Any] = eqx.field(
        static=True, default=_call_layer
    )
    remat: bool | Callable[..., bool] = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not (isinstance(self.remat, bool) or callable(self.remat)):
            raise PipelineError(
                f"`Stage(remat=...)` expects a bool or a `jax.checkpoint_policies` "
                f"policy, got {type(self.remat).__name__}.",
                suggestion="Use remat=True, or e.g. "
                "remat=jax.checkpoint_policies.dots_with_no_batch_dims_saveable.",
            )
        for name in ("where", "pre", "post", "layer_fn"):
            if not callable(getattr(self, name)):
                raise PipelineError(
                    f"`Stage({name}=...)` expects a function, got "
                    f"{type(getattr(self, name)).__name__}.",
                    suggestion="See the `tx.Stage` docstring for each signature.",
                )

    def split(self, model: Any) -> tuple[Any, Any]:
        """`(rest, block)`: the model with its stacked block set to `None`, and the
        block.

        **Raises:** `PipelineError` if `where` does not find a stacked block (a module
        or array whose arrays all share a leading `layers` dim).
        """
        try:
            block = self.where(model)
        except Exception as e:
            raise PipelineError(
                f"`Stage.where` failed on a {type(model).__name__}: {e!r}.",
                suggestion="Pass `where=lambda m: m.<stacked blocks field>`.",
            ) from None
        self.num_layers(block)
        rest = eqx.tree_at(self.where, model, replace_fn=lambda _: None)
        return rest, block

    def merge(self, rest: Any, block: Any) -> Any:
        """The inverse of `split`."""
        return eqx.tree_at(self.where, rest, block, is_leaf=lambda x: x is None)

    @staticmethod
    def num_layers(block: Any) -> int:
        """The size of the stacked block's leading `layers` dim.

        **Raises:** `PipelineError` if it has no arrays or they disagree.
        """
        arrays = [x for x in jax.tree.leaves(block) if eqx.is_array(x)]
        sizes: set[int] = {int(x.shape[0]) if x.ndim else -1 for x in arrays}
        if not arrays or len(sizes) != 1 or -1 in sizes:
            raise PipelineError(
                "The pipeline's stacked block must be a module whose arrays all have "
                f"a leading `layers` dim of one size; found leading sizes {sizes}.",
                suggestion=(
                    "Stack the repeated layers with `eqx.filter_vmap` and point "
                    "`Stage(where=...)` at the stacked module."
                ),
            )
        return next(iter(sizes))

    def run(self, block: Any, h: Any, key: Any, first_layer: Any = 0) -> Any:
        """Run the stacked `block` (any number of layers) on `h`, in order.

        **Arguments:**

        - `block`: stacked layers (leading `layers` dim).
        - `h`: the input activations.
        - `key`: a PRNG key or `None`; layer `i` (counted from `first_layer`, the
            global index of `block`'s first layer) gets `fold_in(key, i)`.
        - `first_layer`: the global index of the first layer (for keys).

        **Returns:** the output activations, shaped like `h`.
        """
        params, static = eqx.partition(block, eqx.is_array)
        n = self.num_layers(params)
        layer_fn = self.layer_fn

        def one(h: Any, layer: Any) -> Any:
            layer_params, index = layer
            k = None if key is None else jax.random.fold_in(key, index)
            return layer_fn(eqx.combine(layer_params, static), h, k)

        if callable(self.remat):
            one = jax.checkpoint(one, policy=self.remat)
        elif self.remat:
            one = jax.checkpoint(one)

        def step(h: Any, layer: Any) -> tuple[Any, None]:
            return one(h, layer), None

        indices = first_layer + jax.numpy.arange(n)
        h, _ = jax.lax.scan(step, h, (params, indices))
        return h
