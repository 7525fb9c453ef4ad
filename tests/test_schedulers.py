"""Schedules and samplers against diffusers' DDIMScheduler / DDPMScheduler."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from diffusers import DDIMScheduler, DDPMScheduler

from fasdiff_jax.diffusion import samplers, schedules
from fasdiff_jax.diffusion.schedules import Schedule
from fasdiff_jax.errors import UnsupportedConfigError

SD_BASE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
               steps_offset=1)
SD_DDPM = {k: v for k, v in SD_BASE.items() if k != "set_alpha_to_one"}


def toy_model(x, t, xp=np):
    """Deterministic stand-in for the UNet; same formula in numpy and jax."""
    return 0.1 * x * xp.sin(t / 100.0) + 0.05 * xp.cos(t / 37.0)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


@pytest.mark.parametrize("sched", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match(sched, zero_snr):
    cfg = dict(beta_schedule=sched, rescale_betas_zero_snr=zero_snr, beta_start=0.00085,
               beta_end=0.012)
    ref = DDIMScheduler(**cfg)
    ours = Schedule.from_diffusers_config(dict(ref.config))
    # zero-SNR betas are 1 - ratio of float32 cumprods: 1-ulp noise there is 1e-7 absolute.
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=1e-4, atol=5e-7)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 1000])
def test_timesteps_match(spacing, n):
    ref = DDIMScheduler(**SD_BASE, timestep_spacing=spacing)
    ref.set_timesteps(n)
    ours = Schedule.from_diffusers_config(dict(ref.config))
    np.testing.assert_array_equal(schedules.ddim_timesteps(ours, n), ref.timesteps.numpy())
    ref_p = DDPMScheduler(**SD_DDPM, timestep_spacing=spacing)
    ref_p.set_timesteps(n)
    np.testing.assert_array_equal(schedules.ddpm_timesteps(ours, n), ref_p.timesteps.numpy())


def _diffusers_ddim(ref, x, n, eta, noises, t_start=None):
    ref.set_timesteps(n)
    xt = torch.from_numpy(np.array(x))  # a writable copy
    ts = [int(t) for t in ref.timesteps if t_start is None or int(t) <= t_start]
    for i, t in enumerate(ts):
        out = toy_model(xt.numpy().astype(np.float64), t).astype(np.float32)
        kw = {}
        if eta > 0:
            kw["variance_noise"] = torch.from_numpy(np.array(noises[i]))
        xt = ref.step(torch.from_numpy(out), t, xt, eta=eta, **kw).prev_sample
    return xt.numpy()


@pytest.mark.parametrize(
    "n,eta,pred,spacing,clip",
    [
        (10, 0.0, "epsilon", "leading", False),
        (50, 0.0, "epsilon", "leading", False),
        (10, 1.0, "epsilon", "leading", False),
        (10, 0.0, "v_prediction", "trailing", False),
        (50, 1.0, "v_prediction", "trailing", False),
        (10, 0.5, "v_prediction", "linspace", False),
        (10, 0.0, "sample", "leading", True),
        (10, 1.0, "epsilon", "trailing", True),
    ],
)
def test_ddim_trajectory_matches_diffusers(n, eta, pred, spacing, clip):
    cfg = dict(SD_BASE, prediction_type=pred, timestep_spacing=spacing, clip_sample=clip)
    if spacing == "trailing":
        cfg.update(steps_offset=0, set_alpha_to_one=True)
    ref = DDIMScheduler(**cfg)
    sched = Schedule.from_diffusers_config(dict(ref.config))
    x = np.array(jax.random.normal(jax.random.key(1), (2, 8, 8, 4)))
    rng = jax.random.key(7)
    ts = schedules.ddim_timesteps(sched, n)
    noises = [np.asarray(samplers.step_noise(rng, i, x.shape)) for i in range(len(ts))]

    ours = jax.jit(
        lambda x, rng: samplers.ddim_sample(
            lambda x, t: toy_model(x, t[:, None, None, None].astype(jnp.float32), jnp),
            sched, x, n, rng, eta=eta)
    )(jnp.asarray(x), rng)
    want = _diffusers_ddim(ref, x, n, eta, noises)
    assert np.isfinite(want).all()
    assert _rel_err(ours, want) <= 1e-4, _rel_err(ours, want)


def test_ddim_t_start_continues_from_intermediate_timestep():
    ref = DDIMScheduler(**SD_BASE)
    sched = Schedule.from_diffusers_config(dict(ref.config))
    ts = schedules.ddim_timesteps(sched, 20, t_start=500)
    assert ts[0] <= 500 and ts[0] + 1000 // 20 > 500 and ts[-1] == 1
    x0 = jax.random.normal(jax.random.key(2), (1, 4, 4, 4))
    xt = schedules.add_noise(sched, x0, jax.random.normal(jax.random.key(3), x0.shape), ts[0])
    ours = samplers.ddim_sample(lambda x, t: toy_model(x, t[:, None, None, None], jnp), sched, xt,
                                20, t_start=500)
    want = _diffusers_ddim(ref, np.asarray(xt), 20, 0.0, None, t_start=500)
    assert _rel_err(ours, want) <= 1e-4
    with pytest.raises(ValueError, match="t_start"):
        schedules.ddim_timesteps(sched, 20, t_start=0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_steps_match(variance_type, pred):
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        variance_type=variance_type, prediction_type=pred, clip_sample=True)
    sched = Schedule.from_diffusers_config(dict(ref.config))
    ref.set_timesteps(25)
    ts = schedules.ddpm_timesteps(sched, 25)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    x = np.array(jax.random.normal(jax.random.key(4), (2, 4, 4, 3)))
    xt_ref = torch.from_numpy(x)
    xt = jnp.asarray(x)
    for i, t in enumerate(ts):
        noise = np.array(jax.random.normal(jax.random.key(100 + i), x.shape))
        out = toy_model(np.asarray(xt), float(t)).astype(np.float32)
        prev_t = int(ts[i + 1]) if i + 1 < len(ts) else -1
        xt = samplers.ddpm_step(sched, jnp.asarray(out), int(t), xt, prev_t, jnp.asarray(noise))
        # diffusers draws its own noise; feed ours through a generator-free monkeypatch.
        orig = torch.randn
        try:
            import diffusers.schedulers.scheduling_ddpm as m
            m_randn = m.randn_tensor
            m.randn_tensor = lambda *a, **k: torch.from_numpy(noise)
            xt_ref = ref.step(torch.from_numpy(out), int(t), xt_ref).prev_sample
        finally:
            m.randn_tensor = m_randn
            torch.randn = orig
        assert _rel_err(xt, xt_ref.numpy()) <= 1e-4, (i, t)


def test_ddpm_batched_timesteps():
    sched = Schedule.create(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    out = 0.3 * x
    noise = jax.random.normal(jax.random.key(1), x.shape)
    t = jnp.array([999, 10, 0])
    prev = t - 1
    batched = samplers.ddpm_step(sched, out, t, x, prev, noise)
    for b in range(3):
        single = samplers.ddpm_step(sched, out[b:b + 1], int(t[b]), x[b:b + 1], int(prev[b]),
                                    noise[b:b + 1])
        np.testing.assert_allclose(batched[b:b + 1], single, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_add_noise_velocity_and_x0(pred):
    ref = DDPMScheduler(**SD_DDPM, prediction_type=pred)
    sched = Schedule.from_diffusers_config(dict(ref.config))
    x0 = np.array(jax.random.normal(jax.random.key(5), (4, 3, 3, 2)))
    noise = np.array(jax.random.normal(jax.random.key(6), x0.shape))
    t = np.array([0, 17, 500, 999])
    # diffusers is NCHW-agnostic here: it broadcasts over trailing dims.
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    got = schedules.add_noise(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert _rel_err(got, want.numpy()) <= 1e-5
    v_want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    v = schedules.get_velocity(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    assert _rel_err(v, v_want.numpy()) <= 1e-5
    # predict_x0 inverts the forward process for the exact model output.
    target = {"epsilon": noise, "v_prediction": np.asarray(v), "sample": x0}[pred]
    x0_hat = schedules.predict_x0(sched, jnp.asarray(target), got, jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(x0_hat)[:3], x0[:3], rtol=1e-3, atol=1e-3)


def test_bad_configs_raise():
    with pytest.raises(UnsupportedConfigError, match="beta_schedule"):
        Schedule.from_diffusers_config({"beta_schedule": "sigmoid"})
    with pytest.raises(UnsupportedConfigError, match="prediction_type"):
        Schedule.from_diffusers_config({"prediction_type": "flow"})
    with pytest.raises(UnsupportedConfigError, match="thresholding"):
        Schedule.from_diffusers_config({"thresholding": True})
    with pytest.raises(UnsupportedConfigError, match="variance_type"):
        Schedule.from_diffusers_config({"variance_type": "learned_range"})
    with pytest.raises(ValueError, match="num_steps"):
        schedules.ddim_timesteps(Schedule.create(), 0)
    with pytest.raises(ValueError, match="noise"):
        samplers.ddim_step(Schedule.create(), jnp.zeros(2), 10, jnp.zeros(2), 10, eta=1.0)
