"""Noise schedules of diffusers' DDPM/DDIM schedulers as a small frozen pytree.

``Schedule.from_diffusers_config(cfg)`` reads a ``scheduler_config.json`` dict; the betas and
``alphas_cumprod`` are computed the way diffusers computes them (float32 torch arithmetic is
reproduced in numpy float32) so samplers built on them match diffusers step for step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fasdiff_jax.errors import UnsupportedConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alphas_bar`` with the cosine (squaredcos_cap_v2) transform."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    a0, at = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - at) * (a0 / (a0 - at))  # diffusers' op order
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Optional[Any] = None,
) -> np.ndarray:
    """Betas (float32, length ``num_train_timesteps``) for a diffusers ``beta_schedule``."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.shape != (num_train_timesteps,):
            raise UnsupportedConfigError(
                f"trained_betas has shape {betas.shape}, expected ({num_train_timesteps},)")
        return betas
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                           dtype=np.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise UnsupportedConfigError(
        f"beta_schedule {beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}")


@struct.dataclass
class Schedule:
    """Everything a DDPM/DDIM step needs; arrays are leaves, the rest is static config."""

    alphas_cumprod: jax.Array  # (num_train_timesteps,) float32
    betas: jax.Array  # (num_train_timesteps,) float32
    final_alpha_cumprod: float = struct.field(pytree_node=False, default=1.0)
    num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    timestep_spacing: str = struct.field(pytree_node=False, default="leading")
    steps_offset: int = struct.field(pytree_node=False, default=0)
    clip_sample: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float = struct.field(pytree_node=False, default=1.0)
    variance_type: str = struct.field(pytree_node=False, default="fixed_small")

    @classmethod
    def create(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Any] = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        rescale_betas_zero_snr: bool = False,
        variance_type: str = "fixed_small",
    ) -> "Schedule":
        """Build a schedule from diffusers' scheduler arguments (same names and defaults)."""
        if prediction_type not in PREDICTION_TYPES:
            raise UnsupportedConfigError(
                f"prediction_type {prediction_type!r} is not supported; choose one of "
                f"{PREDICTION_TYPES}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise UnsupportedConfigError(
                f"timestep_spacing {timestep_spacing!r} is not supported; choose one of "
                f"{TIMESTEP_SPACINGS}")
        if variance_type not in VARIANCE_TYPES:
            raise UnsupportedConfigError(
                f"variance_type {variance_type!r} is not supported; choose one of {VARIANCE_TYPES}")
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas)
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
        if rescale_betas_zero_snr:
            # diffusers: avoid an infinite SNR at the last step.
            alphas_cumprod[-1] = 2.0**-24
        final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
        return cls(
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            betas=jnp.asarray(betas),
            final_alpha_cumprod=final,
            num_train_timesteps=int(num_train_timesteps),
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
            steps_offset=int(steps_offset),
            clip_sample=bool(clip_sample),
            clip_sample_range=float(clip_sample_range),
            variance_type=variance_type,
        )

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> "Schedule":
        """From a diffusers ``scheduler_config.json`` dict (DDIM/DDPM/PNDM/... share the keys).

        Keys we do not model and that change the numbers (dynamic thresholding, learned
        variances) raise :class:`UnsupportedConfigError`; purely informational ones are ignored.
        """
        cfg = {**dict(cfg), **overrides}
        if cfg.get("thresholding", False):
            raise UnsupportedConfigError("scheduler config: thresholding=True (dynamic "
                                         "thresholding) is not supported")
        if cfg.get("timestep_type", "discrete") != "discrete":
            raise UnsupportedConfigError(
                f"scheduler config: timestep_type {cfg['timestep_type']!r} is not supported")
        known = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                 "trained_betas", "prediction_type", "timestep_spacing", "steps_offset",
                 "set_alpha_to_one", "clip_sample", "clip_sample_range",
                 "rescale_betas_zero_snr", "variance_type")
        kwargs = {k: cfg[k] for k in known if k in cfg and cfg[k] is not None}
        kwargs.setdefault("clip_sample", True)  # DDPMScheduler's and DDIMScheduler's default
        return cls.create(**kwargs)


def _gather(values: jax.Array, t: Any, like: jax.Array) -> jax.Array:
    """``values[t]`` shaped to broadcast against ``like``: scalar ``t`` or one per batch row."""
    t = jnp.asarray(t)
    out = values[jnp.clip(t, 0, values.shape[0] - 1)]
    if t.ndim == 1:
        out = out.reshape((-1,) + (1,) * (like.ndim - 1))
    elif t.ndim > 1:
        raise ValueError(f"timesteps must be a scalar or (batch,), got shape {t.shape}")
    return out.astype(like.dtype)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: Any) -> jax.Array:
    """``q(x_t | x_0)`` sample: sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise (diffusers ``add_noise``)."""
    a = _gather(schedule.alphas_cumprod, t, x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def get_velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: Any) -> jax.Array:
    """v-prediction target: sqrt(ᾱ_t)·noise - sqrt(1-ᾱ_t)·x0 (diffusers ``get_velocity``)."""
    a = _gather(schedule.alphas_cumprod, t, x0)
    return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def predict_x0_eps(
    schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: Any
) -> tuple[jax.Array, jax.Array]:
    """(x0, epsilon) implied by ``model_output`` at ``x_t``, per ``schedule.prediction_type``."""
    a = _gather(schedule.alphas_cumprod, t, x_t)
    sa, sb = jnp.sqrt(a), jnp.sqrt(1 - a)
    if schedule.prediction_type == "epsilon":
        return (x_t - sb * model_output) / sa, model_output
    if schedule.prediction_type == "sample":
        return model_output, (x_t - sa * model_output) / sb
    if schedule.prediction_type == "v_prediction":
        return sa * x_t - sb * model_output, sa * model_output + sb * x_t
    raise UnsupportedConfigError(f"prediction_type {schedule.prediction_type!r}")


def predict_x0(schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: Any) -> jax.Array:
    """One-step clean estimate x̂0 from the model output (no clipping)."""
    return predict_x0_eps(schedule, model_output, x_t, t)[0]


def _spaced(schedule: Schedule, num_steps: int) -> np.ndarray:
    """diffusers' ``set_timesteps`` for DDIM/DDPM: descending int64 timesteps."""
    T = schedule.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if schedule.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    else:  # trailing
        ratio = T / num_steps
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    return ts


def ddim_timesteps(schedule: Schedule, num_steps: int, t_start: Optional[int] = None) -> np.ndarray:
    """Descending DDIM timesteps (numpy int32), as ``DDIMScheduler.set_timesteps``.

    With ``t_start`` only the timesteps ``<= t_start`` are kept (sampling that starts from a
    latent noised to ``ddim_timesteps(...)[0]``, like img2img).
    """
    ts = _spaced(schedule, num_steps)
    if t_start is not None:
        ts = ts[ts <= int(t_start)]
        if ts.size == 0:
            raise ValueError(f"t_start={t_start} is below every DDIM timestep of {num_steps} steps")
    return ts.astype(np.int32)


def ddpm_timesteps(schedule: Schedule, num_steps: Optional[int] = None) -> np.ndarray:
    """Descending DDPM timesteps; ``None`` means every training timestep."""
    if num_steps is None:
        return np.arange(schedule.num_train_timesteps - 1, -1, -1, dtype=np.int32)
    return _spaced(schedule, num_steps).astype(np.int32)
