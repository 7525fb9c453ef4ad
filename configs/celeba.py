"""FaSDiff on CelebA-HQ at 256 px with Stable Diffusion 2.1-base (stage 2: all loss terms).

1. Convert SD 2.1-base (a local diffusers folder; nothing is downloaded at run time)::

       python -m fasdiff_jax.convert --diffusers_dir /data/stable-diffusion-2-1-base --out /data/sd21

2. Build CelebA-HQ 256 as ArrayRecord for TFDS (its files are downloaded by hand into
   ``--manual_dir``)::

       tfds build celeb_a_hq/256 --file_format=array_record --manual_dir=/data/celeba_hq_manual

   (or align your own faces: ``python -m fasdiff_jax.data.prepare --input DIR --output
   /data/faces --size 256`` and pass ``--config.data.source=prepared:/data/faces`` with
   held-out faces as ``--config.eval.source=prepared:/data/faces_heldout``, or
   ``--config.eval.source=`` for no held-out evaluation).

3. Train (one host; for pods and clusters see ``launch/``)::

       python -m fasdiff_jax.main --config=configs/celeba.py --workdir=/ckpt/fasdiff_celeba \\
           --config.model.sd_checkpoint=/data/sd21

``model.sd_checkpoint`` has no default: the run refuses to start until it is set. The
compressor/HLFE/control sizes and loss weights are our choices (the paper's are not public).

4. Code and evaluate with the trained model (the run saved its config, the override
   included, as ``/ckpt/fasdiff_celeba/config.json``)::

       python -m fasdiff_jax.codec compress --workdir=/ckpt/fasdiff_celeba faces/ --out_dir=fsd/
       python -m fasdiff_jax.evaluate --workdir=/ckpt/fasdiff_celeba \\
           --source=prepared:/data/faces_heldout --out=fasdiff_celeba.json

   (held-out faces, not from the training split, prepared as in step 2; or CelebA-HQ's
   last 1000, which training leaves out and logs as ``eval/*`` every 2000 steps:
   ``--source=tfds:celeb_a_hq/256:train[29000:]``). Both code with the moving average of
   the trained params the run keeps (``train.ema_decay``; ``--weights=params``: the last
   update's). On another
   machine, copy the workdir and the converted SD folder anywhere and name the folder with
   ``--sd_checkpoint=DIR``: checkpoints name their SD weights by content, not by path.

Expected result: not yet measured (no run of this config has been made).
"""

import os
import sys

import ml_collections
from ml_collections import config_dict

try:
    from configs import base, tiny
except ImportError:  # loaded by path (--config=/abs/path) from outside the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base, tiny


def model_config() -> ml_collections.ConfigDict:
    """tiny's model fields, resized for SD 2.1-base at 256 px."""
    m = tiny.model_config()
    m.image_size = 256
    m.sd_checkpoint = config_dict.placeholder(str)  # required: python -m fasdiff_jax.convert
    # SD's UNet/VAE/scheduler configs are read from the checkpoint's config.json files.
    m.unet, m.vae, m.scheduler = {}, {}, {}
    m.compute_dtype = "bfloat16"
    m.remat = True
    m.attention_impl = "xla"  # "cudnn" on recent NVIDIA GPUs
    m.compressor = dict(N=128, M=192, num_scales=64, prompt_channels=64, dwt_levels=3, groups=32)
    m.hlfe = dict(features=128, num_blocks=2, heads=4, groups=32, dwt_levels=1)
    m.control = dict(embedding_channels=(96, 256), conditioning_scale=1.0)
    m.loss.update(stage=2, rate=0.05, identity=0.1, lpips=0.5, x0_max_timestep=500)
    m.sampler = dict(steps=50, t_start=0, eta=0.0, seed=0)
    return m


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.mesh.data = -1  # pure data parallelism over every device of every host
    config.model = model_config()
    config.data = base.data_config(
        source="tfds:celeb_a_hq/256:train[:29000]", global_batch_size=64,
        image_size=config.model.get_ref("image_size"),  # one size: either override sets both
        seed=0, num_workers=8)
    # the last 1000 faces are held out: their loss terms every 2000 steps (15 batches of 64)
    config.eval = ml_collections.ConfigDict(dict(
        source="tfds:celeb_a_hq/256:train[29000:]", every_steps=2_000, batch_size=64,
        num_batches=0, seed=0, x0_terms=True, images=4,
        best_metric="loss", best_mode="min",  # its checkpoint is kept: --step=best
        at_start=True,  # and the initial params' terms at step 0
        last_params_too=True))  # eval/*: the params' moving average; eval_params/*: the params
    config.train = tiny.get_config().train  # every field, then the real-run values
    config.train.update(steps=200_000, optimizer="adamw", learning_rate=1e-4, weight_decay=1e-2,
                        schedule="warmup_cosine", warmup_steps=2_000, end_learning_rate_ratio=0.1,
                        grad_clip_norm=1.0, x0_every=4, log_every=100, checkpoint_every=2_000,
                        max_to_keep=3, keep_period=20_000,  # and every 20k-th for --step
                        ema_decay=0.9999)  # evaluated and coded with by default (--weights)
    return config
