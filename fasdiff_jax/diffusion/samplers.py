"""DDIM and DDPM steps and a jit-able DDIM sampling loop, matching diffusers' schedulers.

All functions are pure: noise is passed in (``noise``) or drawn from an explicit key, so a
decoder seeded by the key stored in a bitstream reproduces the encoder's trajectory.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from fasdiff_jax.diffusion.schedules import Schedule, _gather, ddim_timesteps, predict_x0_eps


def _alpha_prev(schedule: Schedule, prev_t: Any, like: jax.Array, final: float) -> jax.Array:
    a = _gather(schedule.alphas_cumprod, prev_t, like)
    prev_t = jnp.asarray(prev_t)
    if prev_t.ndim == 1:
        prev_t = prev_t.reshape((-1,) + (1,) * (like.ndim - 1))
    return jnp.where(prev_t >= 0, a, jnp.asarray(final, like.dtype))


def _clip(schedule: Schedule, x0: jax.Array) -> jax.Array:
    if schedule.clip_sample:
        r = schedule.clip_sample_range
        x0 = jnp.clip(x0, -r, r)
    return x0


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    t: Any,
    x_t: jax.Array,
    num_steps: int,
    eta: float = 0.0,
    noise: Optional[jax.Array] = None,
    use_clipped_model_output: bool = False,
) -> jax.Array:
    """``DDIMScheduler.step(...).prev_sample``; previous timestep is ``t - T // num_steps``.

    ``noise`` (standard normal, shape of ``x_t``) is required when ``eta > 0``.
    """
    prev_t = jnp.asarray(t) - schedule.num_train_timesteps // num_steps
    a_t = _gather(schedule.alphas_cumprod, t, x_t)
    a_prev = _alpha_prev(schedule, prev_t, x_t, schedule.final_alpha_cumprod)
    b_t = 1 - a_t
    x0, eps = predict_x0_eps(schedule, model_output, x_t, t)
    x0 = _clip(schedule, x0)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    if use_clipped_model_output:
        eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
    if not (isinstance(eta, (int, float)) and eta == 0):
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        prev = prev + std * noise
    return prev


def _ddpm_variance(schedule: Schedule, a_t: jax.Array, a_prev: jax.Array) -> jax.Array:
    """Standard deviation of the DDPM posterior for ``schedule.variance_type``."""
    beta_t = 1 - a_t / a_prev
    if schedule.variance_type == "fixed_large":
        return jnp.sqrt(beta_t)
    var = jnp.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
    if schedule.variance_type == "fixed_small_log":
        return jnp.exp(0.5 * jnp.log(var))
    return jnp.sqrt(var)


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    t: Any,
    x_t: jax.Array,
    prev_t: Any,
    noise: Optional[jax.Array] = None,
) -> jax.Array:
    """``DDPMScheduler.step(...).prev_sample`` from ``t`` to ``prev_t`` (-1 after the last).

    Noise is added when ``t > 0``, as diffusers does; ``noise`` is then required.
    """
    a_t = _gather(schedule.alphas_cumprod, t, x_t)
    a_prev = _alpha_prev(schedule, prev_t, x_t, 1.0)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    alpha_t = a_t / a_prev
    x0, _ = predict_x0_eps(schedule, model_output, x_t, t)
    x0 = _clip(schedule, x0)
    mean = (jnp.sqrt(a_prev) * (1 - alpha_t) / b_t) * x0 + (jnp.sqrt(alpha_t) * b_prev / b_t) * x_t
    if noise is None:
        raise ValueError("ddpm_step needs `noise` (it is used whenever t > 0)")
    tt = jnp.asarray(t)
    if tt.ndim == 1:
        tt = tt.reshape((-1,) + (1,) * (x_t.ndim - 1))
    std = _ddpm_variance(schedule, a_t, a_prev)
    return mean + jnp.where(tt > 0, std, 0.0).astype(x_t.dtype) * noise


def step_noise(rng: jax.Array, i: Any, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The noise ``ddim_sample`` injects at step ``i``: ``normal(fold_in(rng, i))``."""
    return jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)


def ddim_sample(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x: jax.Array,
    num_steps: int,
    rng: Optional[jax.Array] = None,
    eta: float = 0.0,
    t_start: Optional[int] = None,
) -> jax.Array:
    """Run DDIM from ``x`` (noise at the first timestep) to the clean sample.

    ``model_fn(x, t)`` returns the model output (per ``schedule.prediction_type``) with ``t``
    a (batch,) int32 array. With ``t_start``, ``x`` must be the latent noised to
    ``ddim_timesteps(schedule, num_steps, t_start)[0]``. Runs as one ``lax.scan`` (jit-able;
    ``num_steps`` and ``t_start`` are static). For ``eta > 0`` step ``i`` uses
    :func:`step_noise` ``(rng, i, x.shape)``.
    """
    ts = ddim_timesteps(schedule, num_steps, t_start)
    stochastic = not (isinstance(eta, (int, float)) and eta == 0)
    if stochastic and rng is None:
        raise ValueError("ddim_sample with eta > 0 needs `rng`")

    def body(x, inp):
        i, t = inp
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        out = model_fn(x, tb).astype(x.dtype)
        noise = step_noise(rng, i, x.shape, x.dtype) if stochastic else None
        return ddim_step(schedule, out, t, x, num_steps, eta=eta, noise=noise), None

    idx = jnp.arange(len(ts), dtype=jnp.int32)
    x, _ = jax.lax.scan(body, x, (idx, jnp.asarray(ts, jnp.int32)))
    return x


__all__ = ["ddim_step", "ddpm_step", "ddim_sample", "step_noise", "ddim_timesteps"]
