"""The mbt2018-mean baseline (Minnen et al. 2018; CompressAI's ``MeanScaleHyperprior``)
trained with the FaSDiff train loop: same mesh, input pipeline, logging, checkpoints and
resume, on rate + lmbda·255²·MSE. A rate point per lmbda, on the same faces as FaSDiff, for
BD-rate anchors:

    python -m fasdiff_jax.main --config=configs/mbt2018_mean.py --workdir=runs/mbt_q4 \\
        --config.data.source=prepared:data/faces256 --config.model.lmbda=0.0130 \\
        --config.eval.source=prepared:data/faces_heldout
    python -m fasdiff_jax.evaluate --workdir=runs/mbt_q4 --source=prepared:data/faces_heldout \\
        --out=mbt_q4.json
    python -m fasdiff_jax.codec compress --workdir=runs/mbt_q4 faces/ --out_dir=fsd_mbt_q4/

``model.lmbda`` of CompressAI's quality levels 1-8: ``hyperprior.COMPRESSAI_LAMBDAS``
(0.0018 ... 0.18). ``hs_activation="leaky_relu"`` is CompressAI's h_s; the files decode
identically everywhere through our integer h_s either way.

Expected result: not yet measured at this size (no accelerator here). On CPU the same loop
with N=8, M=12 at 64 px (``tests/test_baseline_training.py``) lowers the loss within 40
steps and its checkpoints code files through the codec and evaluate commands.
"""

import os
import sys

import ml_collections

try:
    from configs import base, tiny
except ImportError:  # loaded by path (--config=/abs/path) from outside the repository root
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base, tiny


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.mesh.data = -1  # data parallel over every device; the ~5M params are replicated
    config.model = ml_collections.ConfigDict(dict(
        kind="hyperprior", N=128, M=192, num_scales=128, hs_activation="leaky_relu",
        lmbda=0.0130, image_size=256))
    config.data = base.data_config(
        source="tfds:celeb_a_hq/256:train[:29000]", global_batch_size=16, seed=0,
        image_size=config.model.get_ref("image_size"))  # one size: either override sets both
    # held-out rate, MSE and PSNR (latents rounded as coded) on the last 1000 faces
    config.eval = ml_collections.ConfigDict(dict(
        source="tfds:celeb_a_hq/256:train[29000:]", every_steps=5_000, batch_size=16,
        num_batches=0, seed=0, x0_terms=False, images=4,
        best_metric="loss", best_mode="min",  # the best rate-distortion loss: --step=best
        at_start=True,  # and the initial params' loss at step 0
        last_params_too=False))  # with train.ema_decay > 0: also the params' own (eval_params/*)
    config.train = tiny.get_config().train  # every field, then the baseline's values
    config.train.update(steps=500_000, optimizer="adam", learning_rate=1e-4, x0_every=0,
                        log_every=100, checkpoint_every=5_000, max_to_keep=3)
    config.train.lr_multipliers = ml_collections.ConfigDict(dict(hyperprior=1.0))  # one part
    return config
