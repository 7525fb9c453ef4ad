"""The jitted steps of the train loop for every model it runs (FaSDiff, the mbt2018-mean
baseline): the train step (only the trainable subtree is differentiated and updated, and
with a mesh the state keeps its shardings across steps), and the held-out evaluation and
picture steps."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fasdiff_jax import sharding

Params = dict[str, Any]
LossFn = Callable[[Params, Any, jax.Array], tuple[jax.Array, dict]]
SplitFn = Callable[[Params], tuple[Params, Params]]


def split_microbatches(x: jax.Array, count: int) -> jax.Array:
    """(B, ...) -> (count, B // count, ...): microbatch m holds examples m, m + count, ...,
    so each device's shard of a batch split over devices gives each microbatch an equal part
    of its own examples (no data moves between devices)."""
    if x.shape[0] % count:
        raise ValueError(f"a batch of {x.shape[0]} does not split into {count} microbatches")
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)


def make_train_step(loss_fn: LossFn, split: SplitFn, optimizer: optax.GradientTransformation,
                    mesh: Mesh | None = None, param_shardings: Any = None,
                    opt_shardings: Any = None, donate: bool = True,
                    microbatches: int = 1, gather_params_over: Sequence[str] = ()) -> Callable:
    """``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``, jitted.

    ``loss_fn(params, batch, rng) -> (loss, metrics)``; ``split(params) -> (trainable,
    frozen)``: frozen leaves pass through untouched (bit-identical); ``opt_state`` is
    ``optimizer.init(trainable)``. ``metrics`` gains ``grad_norm``. With a ``mesh``,
    params/opt state keep their shardings (default: replicated) and the batch keeps the
    layout the input pipeline gave it, so steps never recompile for a new layout.
    ``donate`` reuses the buffers of the params and optimizer state passed in.

    ``microbatches`` > 1 (gradient accumulation): the batch is split
    (:func:`split_microbatches`) and a ``lax.scan`` sums each part's gradients and metrics,
    then divides by their count, so activations are held for one part at a time; one optimizer
    update per step, as with the whole batch (equal for mean losses up to float rounding; each
    part draws from its own fold of ``rng``). A scan, not an unrolled loop: unrolled, XLA
    overlaps the parts and saves no memory. (XLA:CPU keeps its own conv gradients slow inside
    loops; ``layers.conv2d``'s are written in the form it runs fast there.)

    ``gather_params_over`` (mesh axes; the train loop passes the batch axes on the meshes
    that need it, :func:`fasdiff_jax.train.params_gathered_over`): the losses see the params
    gathered over these axes (:func:`fasdiff_jax.sharding.gathered_over`), as FSDP computes,
    and the gradients come back to the params' own shardings. Left to itself, XLA's SPMD
    partitioner (jax 0.10.2) computed conv input gradients wrong when a kernel's input
    channels and the batch share a mesh axis and another axis splits the output channels:
    data=2, fsdp=2, tensor=2 gave 32-45% relative error in every trainable component of
    configs/tiny.py while the loss agreed to 1e-7 (jax-ml/jax#16894); with the params
    gathered the error is 1e-6 (``tests/test_train.py``).
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    compute = None
    if mesh is not None and param_shardings is not None and gather_params_over:
        whole = sharding.gathered_over(param_shardings, gather_params_over)
        compute = (whole, whole) if isinstance(whole, NamedSharding) else split(whole)

    def step(params, opt_state, batch, rng):
        train, frozen = split(params)
        frozen_used = frozen if compute is None else jax.lax.with_sharding_constraint(
            frozen, compute[1])

        def grads_of(b, r):
            def loss(tr):
                if compute is not None:  # its transpose returns the gradients to their layout
                    tr = jax.lax.with_sharding_constraint(tr, compute[0])
                return loss_fn({**tr, **frozen_used}, b, r)

            (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(train)
            return grads, metrics

        if microbatches == 1:
            grads, metrics = grads_of(batch, rng)
        else:
            parts = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)
            rngs = jax.random.split(rng, microbatches)
            shapes = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], parts), rngs[0])

            def accumulate(total, part):
                return jax.tree.map(jnp.add, total, grads_of(*part)), None

            total, _ = jax.lax.scan(accumulate, jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), shapes), (parts, rngs))
            grads, metrics = jax.tree.map(lambda v: v / microbatches, total)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, train)
        return {**optax.apply_updates(train, updates), **frozen}, opt_state, metrics

    donated = (0, 1) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donated)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = replicated if param_shardings is None else param_shardings
    o_sh = replicated if opt_shardings is None else opt_shardings
    return jax.jit(step, donate_argnums=donated, in_shardings=(p_sh, o_sh, None, replicated),
                   out_shardings=(p_sh, o_sh, replicated))


def make_eval_step(metrics_fn: LossFn, mesh: Mesh | None = None,
                   param_shardings: Any = None) -> Callable:
    """``eval_step(params, batch, rng) -> metrics``, jitted: ``metrics_fn``'s metrics (its
    loss and terms) without gradients."""
    return _jit_on_params(lambda params, batch, rng: metrics_fn(params, batch, rng)[1], mesh,
                          param_shardings)


def make_sample_step(reconstruct_fn: Callable[[Params, Any, jax.Array], jax.Array], count: int,
                     mesh: Mesh | None = None, param_shardings: Any = None) -> Callable:
    """``step(params, batch, rng) -> (originals, reconstructions)`` of the batch's first
    ``count`` images, jitted; replicated, so every process holds them whole (process 0 writes
    them). ``reconstruct_fn(params, uint8 images, rng)`` returns floats in [0, 1]."""

    def step(params, batch, rng):
        images = batch["image"][:count]
        return images, reconstruct_fn(params, images, rng)

    return _jit_on_params(step, mesh, param_shardings)


def _jit_on_params(step: Callable, mesh: Mesh | None, param_shardings: Any) -> Callable:
    """``step(params, batch, rng)`` jitted; with a ``mesh``, params keep ``param_shardings``
    (default: replicated), the batch the input pipeline's layout (as in the train step), and
    the outputs are replicated."""
    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = replicated if param_shardings is None else param_shardings
    return jax.jit(step, in_shardings=(p_sh, None, replicated), out_shardings=replicated)
