"""Tiny FaSDiff on random SD weights: for tests and a CPU smoke run, not for quality.

    python -m fasdiff_jax.main --config=configs/tiny.py --workdir=/tmp/fasdiff_tiny

Expected: 64x64 faces from the embedded default (its held-out split: ``eval/*`` every 100
steps, 8 images); every loss term finite; rate, diffusion, latent and high-frequency fall
over a few hundred CPU steps. Identity and LPIPS on x̂0 (every ``x0_every`` steps) are
logged but stay near 0.065 / 0.71 on fresh batches with random SD.
The SD UNet/VAE are random (no checkpoint), so reconstructions are not faces; that is what
the ``celeba`` config with a converted SD checkpoint is for.
"""

import os
import sys

import ml_collections

try:
    from configs import base
except ImportError:  # loaded by path (--config=/abs/path) from outside the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base


def model_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.image_size = 64
    m.sd_checkpoint = ""  # a folder written by `python -m fasdiff_jax.convert`; "" = random
    m.text_length = 4  # random null-text embedding length when there is no checkpoint
    m.compute_dtype = "float32"
    m.remat = False
    m.attention_impl = "xla"
    # diffusers-style configs of the (random, frozen) SD parts.
    m.unet = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=4,
                  out_channels=4, block_out_channels=(16, 32),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                  cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    m.vae = dict(_class_name="AutoencoderKL", block_out_channels=(8, 8, 16, 16),
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
                 latent_channels=4, norm_num_groups=4, sample_size=64)
    m.scheduler = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", prediction_type="epsilon",
                       timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    m.compressor = dict(N=16, M=24, num_scales=64, prompt_channels=8, dwt_levels=3, groups=4)
    m.hlfe = dict(features=16, num_blocks=1, heads=2, groups=4, dwt_levels=1)
    m.control = dict(embedding_channels=(8, 16), conditioning_scale=1.0)
    m.loss = dict(stage=2, rate=0.05, diffusion=1.0, latent=1.0, high_freq=0.5, hf_levels=2,
                  identity=0.1, lpips=0.5, x0_max_timestep=1000,
                  identity_crop=(0.175, 0.125, 0.75))
    m.lpips_net = "alexnet"
    m.sampler = dict(steps=4, t_start=0, eta=0.0, seed=0)
    return m


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = model_config()
    # one size for both (an override of either sets the other): the model is built and
    # evaluated at model.image_size, trained on crops of data.image_size
    config.data = base.data_config(
        source="embedded:train", image_size=config.model.get_ref("image_size"),
        global_batch_size=8, seed=0)
    config.train = ml_collections.ConfigDict(dict(
        steps=200, learning_rate=1e-3, x0_every=10, log_every=20, checkpoint_every=100,
        optimizer="adam", b1=0.9, b2=0.999, weight_decay=0.0, schedule="constant",
        warmup_steps=0, end_learning_rate_ratio=0.0, grad_clip_norm=0.0, max_to_keep=3,
        keep_period=0, profile_steps=0, profile_first_step=10, on_process_count_change="error",
        microbatches=1, ema_decay=0.0,
        lr_multipliers=dict(compressor=1.0, hlfe=1.0, controlnet=1.0)))
    # held-out loss terms every 100 steps on the embedded default's held-out faces and crops
    config.eval = ml_collections.ConfigDict(dict(
        source="embedded:heldout", every_steps=100, batch_size=8, num_batches=0, seed=0,
        x0_terms=True, images=4, best_metric="loss", best_mode="min",  # kept: --step=best
        at_start=False, last_params_too=False))
    return config
