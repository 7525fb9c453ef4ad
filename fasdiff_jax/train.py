"""The FaSDiff train loop: sharded state, CLU logging, Orbax checkpoints, exact resume.

``train_and_evaluate(config, workdir)`` (driven by ``python -m fasdiff_jax.main``) trains the
model :func:`build_model` makes of ``config.model``: FaSDiff, or with ``kind="hyperprior"`` the
mbt2018-mean baseline (all of it trainable, no x̂0 step):

* mesh from ``config.mesh``; params placed with shardings from ``config.logical_axis_rules``
  (each component's logical names come from its module; components without names, e.g. the
  null-text embedding and LPIPS, are replicated); optimizer state follows its params;
* optax optimizer from ``config.train`` (:func:`make_optimizer`);
* two compiled steps: the cheap one, and the one with the x̂0 terms (identity, LPIPS) run
  every ``config.train.x0_every`` steps in stage 2;
* CLU writer (summaries only on process 0) with every loss term as its own scalar, and
  ``ReportProgress``; every logged step goes through :func:`fasdiff.check_finite`, and the
  trainable params are checked before every save, so a NaN stops the run with
  :class:`NonFiniteLossError` and the last good checkpoint stays the latest one;
* held-out evaluation (``config.eval``, :data:`EVAL_DEFAULTS`): every ``every_steps`` steps
  the loss terms on the same held-out images (no augmentation), latents rounded as in
  coding and the diffusion terms' timesteps/noise drawn from ``eval.seed``, logged as
  ``eval/*`` (bpp, each term, ``psnr`` for the baseline), so the curves compare across steps,
  and ``eval.images`` held-out faces beside their reconstructions (FaSDiff: the config's
  sampler from the rounded latents) as ``eval/reconstructions`` pictures; each evaluation
  saves a checkpoint with its metrics, and the best by ``eval.best_metric`` is kept
  (:func:`checkpoint_options`; ``--step=best`` in the codec and evaluate commands);
* Orbax checkpoints of the *trainable* params, optimizer state, step and the Grain iterator
  state (one JSON file per process). Frozen SD/metric networks are rebuilt from the config
  (``model.sd_checkpoint`` or the seeded random stand-ins), never re-saved. A run started in
  a workdir that has checkpoints resumes from the latest; the steps after a resume are the
  ones an uninterrupted run would have taken (same batches, same per-step rng). SIGTERM (a
  preemption notice) makes the loop save the step it is on and return early. A checkpoint
  from another number of processes is refused unless ``config.train.on_process_count_change``
  is ``"restart_data"`` (see :func:`_data_state_fits`);
* the run's config goes to ``workdir/config.json`` (:func:`save_run_config`), the model the
  codec and evaluate commands rebuild;
* the workdir may be a local path or a URL Orbax and CLU can write (``gs://...``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging as std_logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.traverse_util import flatten_dict
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fasdiff_jax import sharding
from fasdiff_jax.data.pipeline import (DataConfig, make_train_iterator, open_data_source,
                                       state_workers, stream_batches)
from fasdiff_jax.errors import (CheckpointError, FasdiffError, NonFiniteLossError,
                                WorkdirInUseError, WriteError, listed)
from fasdiff_jax.files import free_bytes, remove_stale_temps, temp_name, write_failure
from fasdiff_jax.models import fasdiff
from fasdiff_jax.models import hyperprior as H
from fasdiff_jax.models import layers, perceptual, train_step

# Fields of ``config.train`` and their defaults (a config may omit any of them).
TRAIN_DEFAULTS: dict[str, Any] = dict(
    steps=1000,
    optimizer="adam",  # "adam" | "adamw"
    learning_rate=1e-4,
    b1=0.9,
    b2=0.999,
    weight_decay=0.0,  # adamw only
    schedule="constant",  # "constant" | "warmup_cosine" (warmup_steps, then cosine to end)
    warmup_steps=0,
    end_learning_rate_ratio=0.0,  # cosine end value / learning_rate
    grad_clip_norm=0.0,  # global-norm clipping; 0 = off
    # {component: factor} on the learning rate of a trainable component (FaSDiff: compressor,
    # hlfe, controlnet; the baseline: hyperprior), e.g. a lower rate for the ControlNet copied
    # from the SD UNet; 0 holds one at its value; may change between resumes (no state)
    lr_multipliers={},
    # > 0: keep an exponential moving average of the trainable params with this decay (e.g.
    # 0.999), bias-corrected (:func:`with_params_ema`); held-out evaluation, the best checkpoint
    # and by default the codec and evaluate commands use it; 0 = none
    ema_decay=0.0,
    # gradient accumulation: each step's batch in this many parts, one after another (less
    # activation memory, one optimizer update per step); the batch each device holds must split
    microbatches=1,
    x0_every=10,  # identity + LPIPS step every this many steps (stage 2); 0 = never
    log_every=20,
    checkpoint_every=100,
    max_to_keep=3,
    keep_period=0,  # also keep every checkpoint whose step is a multiple of this; 0 = none
    # a jax.profiler trace (TensorBoard's profile plugin, workdir/plugins/profile) of this
    # many steps from step profile_first_step on (after compilation); 0 = none
    profile_steps=0,
    profile_first_step=10,
    # A checkpoint written by another number of processes (hosts): "error", or "restart_data"
    # (params and optimizer state resume; each process's data stream starts afresh).
    on_process_count_change="error",
)


# Fields of ``config.eval`` (held-out metrics while training) and their defaults; a config
# without ``eval`` (e.g. a run config saved before it existed) evaluates nothing.
EVAL_DEFAULTS: dict[str, Any] = dict(
    source="",  # held-out images, a spec as config.data.source takes; "" = no evaluation
    every_steps=0,  # evaluate after every this many steps; 0 = never
    batch_size=0,  # global batch; 0 = config.data.global_batch_size
    num_batches=0,  # at most this many batches per evaluation; 0 = all whole batches
    seed=0,  # the diffusion terms' timesteps and noise: the same draw at every evaluation
    x0_terms=True,  # FaSDiff: identity and LPIPS on x̂0 too (where their weights are > 0)
    images=4,  # this many held-out faces and their reconstructions logged as pictures; 0 = none
    at_start=False,  # also evaluate the initial params, logged at step 0 (a fresh run only)
    # where the run keeps a moving average of the params (train.ema_decay), eval/* are the
    # average's; this also logs the last update's params as eval_params/* (one more pass)
    last_params_too=False,
    # Every evaluation saves a checkpoint with its metrics, and the one with the best value of
    # this eval metric is kept besides the max_to_keep latest and keep_period's milestones
    # (codec / evaluate --step=best); "" = none of that.
    best_metric="loss",
    best_mode="min",  # "min" | "max" (e.g. for "psnr")
)


class TrainConfigError(FasdiffError, ValueError):
    """``config.train`` has an unknown field or a value the loop cannot use."""


MODEL_KINDS = ("fasdiff", "hyperprior")
Model = fasdiff.FaSDiff | H.TrainableHyperprior


def build_model(model_cfg: Any, new_run: bool = True) -> Model:
    """``config.model.kind``: "fasdiff" (default) or "hyperprior" (the mbt2018-mean baseline,
    ``configs/mbt2018_mean.py``); ``new_run``: see :func:`fasdiff.build`."""
    kind = model_cfg.get("kind", "fasdiff")
    if kind not in MODEL_KINDS:
        raise TrainConfigError(f"config.model.kind={kind!r}: expected one of {MODEL_KINDS}")
    if kind == "hyperprior":
        _check_number("model.lmbda", model_cfg["lmbda"])
        _check_sizes("model", model_cfg)
        return H.TrainableHyperprior.from_config(model_cfg)
    _check_fasdiff_fields(model_cfg)
    model = fasdiff.build(model_cfg, new_run)
    _check_fasdiff_levels(model_cfg, model)
    try:
        model.sampler_spec()
    except ValueError as e:
        raise TrainConfigError(f"config.model.sampler: {e}") from None
    return model


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
LOSS_WEIGHTS = ("rate", "diffusion", "latent", "high_freq", "identity", "lpips")


def _check_number(name: str, value: Any, least: float = 0.0, *, above: bool = False,
                  below: float = math.inf) -> None:
    """A number (not a bool) >= ``least`` (> with ``above``) and < ``below``, so finite by
    default: a negative loss weight maximises its term, a NaN rate trains to NaN."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and value < below
          and (value > least if above else value >= least))
    if not ok:
        bounds = (f"a finite number {'>' if above else '>='} {least:g}" if below == math.inf
                  else f"in [{least:g}, {below:g})")
        raise TrainConfigError(f"config.{name} must be {bounds}, got {value!r}")


def _check_int(name: str, value: Any, least: int, most: int | None = None) -> None:
    if (isinstance(value, bool) or not isinstance(value, int) or value < least
            or (most is not None and value > most)):
        bounds = f">= {least}" if most is None else f"in {least}..{most}"
        raise TrainConfigError(f"config.{name} must be an integer {bounds}, got {value!r}")


def _check_sizes(where: str, cfg: Any) -> None:
    """The hyperprior's N, M and num_scales (:func:`H.check_sizes`), named in the config."""
    _check_int(f"{where}.N", cfg.get("N"), 1)
    _check_int(f"{where}.M", cfg.get("M"), 1)
    _check_int(f"{where}.num_scales", cfg.get("num_scales", 128), *H.NUM_SCALES_RANGE)


def _check_fasdiff_levels(m: Any, model: fasdiff.FaSDiff) -> None:
    """Haar levels: the compressor's image-side DWT feeds one of its VAE-rate stages per
    level, and HLFE's LL band must exist for the smallest codable image, whose coarse latent
    (a ``model.multiple`` image over the VAE's factor) halves only this many times."""
    vae_levels = model.compressor.vae_levels
    _check_int("model.compressor.dwt_levels", m["compressor"]["dwt_levels"], 0, vae_levels)
    _check_int("model.hlfe.dwt_levels", m["hlfe"]["dwt_levels"], 0,
               model.multiple.bit_length() - 1 - vae_levels)


def _check_fasdiff_fields(m: Any) -> None:
    """Fields whose bad values failed only inside Flax's init or trace (a traceback naming no
    field) or were taken silently (``loss.stage=3`` trained as stage 2, a negative loss weight
    maximised its term)."""
    stage = m["loss"]["stage"]
    if stage not in (1, 2):
        raise TrainConfigError(f"config.model.loss.stage must be 1 or 2, got {stage!r}")
    for k in LOSS_WEIGHTS:
        _check_number(f"model.loss.{k}", m["loss"][k])
    comp, hlfe = m["compressor"], m["hlfe"]
    _check_int("model.loss.x0_max_timestep", m["loss"]["x0_max_timestep"], 0)  # past T-1: all
    _check_int("model.hlfe.num_blocks", hlfe["num_blocks"], 0)
    _check_sizes("model.compressor", comp)
    for name, value in (("compressor.prompt_channels", comp["prompt_channels"]),
                        ("hlfe.features", hlfe["features"]),
                        *((f"control.embedding_channels[{i}]", c)
                          for i, c in enumerate(m["control"]["embedding_channels"]))):
        _check_int(f"model.{name}", value, 1)
    for name, value, allowed in (
            ("compute_dtype", m.get("compute_dtype", "float32"), COMPUTE_DTYPES),
            ("attention_impl", m.get("attention_impl", "xla"),
             tuple(layers.ATTENTION_IMPLEMENTATIONS)),
            ("lpips_net", m.get("lpips_net", "alexnet"), perceptual.NETS)):
        if value not in allowed:
            raise TrainConfigError(f"config.model.{name} must be one of {allowed}, got {value!r}")
    for name, d, of_name, of in (("compressor.groups", comp["groups"], "compressor.N", comp["N"]),
                                 ("hlfe.groups", hlfe["groups"], "hlfe.features", hlfe["features"]),
                                 ("hlfe.heads", hlfe["heads"], "hlfe.features", hlfe["features"])):
        if d < 1 or of % d:
            raise TrainConfigError(f"config.model.{name}={d} must divide "
                                   f"config.model.{of_name}={of}")


def _merged_section(config: ml_collections.ConfigDict, name: str, defaults: Mapping[str, Any],
                    counts: tuple[str, ...]) -> dict[str, Any]:
    """``config.<name>`` (absent: empty) over ``defaults``; an unknown field, or one of
    ``counts`` that is not a non-negative integer, raises."""
    given = config.get(name)
    given = dict(given.to_dict() if hasattr(given, "to_dict") else given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TrainConfigError(f"config.{name}: unknown fields {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **given}
    for k in counts:
        if int(merged[k]) != merged[k] or merged[k] < 0:
            raise TrainConfigError(f"config.{name}.{k} must be a non-negative integer, got "
                                   f"{merged[k]!r}")
    return merged


def train_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.train`` merged over :data:`TRAIN_DEFAULTS`; unknown or bad fields raise."""
    tc = _merged_section(config, "train", TRAIN_DEFAULTS, (
        "steps", "warmup_steps", "x0_every", "log_every", "checkpoint_every", "max_to_keep",
        "keep_period", "profile_steps", "profile_first_step", "microbatches"))
    for k in ("log_every", "checkpoint_every", "max_to_keep", "microbatches"):
        if tc[k] < 1:
            raise TrainConfigError(f"config.train.{k} must be >= 1, got {tc[k]!r}")
    if tc["optimizer"] not in ("adam", "adamw"):
        raise TrainConfigError(f"config.train.optimizer must be 'adam' or 'adamw', got {tc['optimizer']!r}")
    if tc["schedule"] not in ("constant", "warmup_cosine"):
        raise TrainConfigError(
            f"config.train.schedule must be 'constant' or 'warmup_cosine', got {tc['schedule']!r}")
    _check_number("train.learning_rate", tc["learning_rate"], above=True)
    for k in ("b1", "b2"):  # Adam's moment decays; 1 or more never forgets, or diverges
        _check_number(f"train.{k}", tc[k], below=1.0)
    for k in ("weight_decay", "grad_clip_norm", "end_learning_rate_ratio"):
        _check_number(f"train.{k}", tc[k])
    if not 0.0 <= float(tc["ema_decay"]) < 1.0:
        raise TrainConfigError(f"config.train.ema_decay must be in [0, 1) (0: no EMA), got "
                               f"{tc['ema_decay']!r}")
    if tc["on_process_count_change"] not in ("error", "restart_data"):
        raise TrainConfigError("config.train.on_process_count_change must be 'error' or "
                               f"'restart_data', got {tc['on_process_count_change']!r}")
    return tc


def _check_microbatches(config: ml_collections.ConfigDict, mesh: Mesh, count: int) -> None:
    """Each device's part of the batch must split into ``count`` equal microbatches."""
    data = DataConfig.from_config(config.data)
    shards = sharding.batch_shards(mesh, data.batch_axes)
    if data.global_batch_size % (shards * count):
        raise TrainConfigError(
            f"config.train.microbatches={count}: the global batch {data.global_batch_size} "
            f"over {shards} batch shards is {data.global_batch_size / shards:g} per shard, "
            f"which does not split into {count} equal parts")


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """What :func:`evaluate_held_out` reads: the pipeline settings (no shuffle, no
    augmentation, one pass), the opened source and the number of batches per evaluation."""

    data: DataConfig
    source: Any
    batches: int
    every_steps: int
    seed: int
    x0_terms: bool
    images: int
    best_metric: str = ""
    best_mode: str = "min"
    at_start: bool = False
    last_params_too: bool = False


def held_out_settings(config: ml_collections.ConfigDict, mesh: Mesh, steps: int
                      ) -> HeldOut | None:
    """``config.eval`` merged over :data:`EVAL_DEFAULTS`; None when evaluation is off or
    comes after the run's last step (``steps``). The source is opened here, so a bad one
    fails at the start, not after ``every_steps``."""
    ec = _merged_section(config, "eval", EVAL_DEFAULTS,
                         ("every_steps", "batch_size", "num_batches", "images"))
    if ec["best_mode"] not in ("min", "max"):
        raise TrainConfigError(f"config.eval.best_mode must be 'min' or 'max', got "
                               f"{ec['best_mode']!r}")
    if not ec["source"] or not ec["every_steps"] or ec["every_steps"] > steps:
        return None
    train_data = DataConfig.from_config(config.data)
    data = dataclasses.replace(
        train_data, source=ec["source"], seed=0, shuffle=False, num_epochs=1, augment=False,
        num_workers=0, global_batch_size=int(ec["batch_size"]) or train_data.global_batch_size)
    source = open_data_source(data)
    shards = sharding.batch_shards(mesh, data.batch_axes)
    procs = jax.process_count()
    if data.global_batch_size % shards or data.global_batch_size % procs:
        raise TrainConfigError(
            f"config.eval.batch_size {data.global_batch_size} is not divisible by the {shards} "
            f"shards of the mesh's batch axes and the {procs} processes")
    whole = (len(source) // procs) // (data.global_batch_size // procs)
    if whole < 1:
        raise TrainConfigError(
            f"config.eval.source {data.source!r} has {len(source)} images, fewer than one "
            f"batch of {data.global_batch_size} (set config.eval.batch_size lower)")
    batches = min(whole, int(ec["num_batches"]) or whole)
    logging.info("held-out evaluation every %d steps: %d images of %s", ec["every_steps"],
                 batches * data.global_batch_size, data.source)
    return HeldOut(data, source, batches, int(ec["every_steps"]), int(ec["seed"]),
                   bool(ec["x0_terms"]), min(int(ec["images"]), data.global_batch_size),
                   str(ec["best_metric"]), str(ec["best_mode"]), bool(ec["at_start"]),
                   bool(ec["last_params_too"]))


def _check_best_metric(eval_step: Any, params: Any, held_out: HeldOut) -> None:
    """Refuse a ``best_metric`` the evaluation does not log, at the start rather than at the
    first evaluation (``every_steps`` into the run); the names come from tracing, not running."""
    if not held_out.best_metric:
        return
    d = held_out.data
    batch = {"image": jax.ShapeDtypeStruct((d.global_batch_size, d.image_size, d.image_size, 3),
                                           jnp.uint8)}
    names = set(jax.eval_shape(eval_step, params, batch, jax.random.key(0)))
    if "mse" in names:
        names.add("psnr")  # evaluate_held_out adds it
    if held_out.best_metric not in names:
        raise TrainConfigError(f"config.eval.best_metric={held_out.best_metric!r} is not among "
                               f"the held-out metrics {sorted(names)} (\"\" keeps no best "
                               f"checkpoint)")


def _ranked_metric(name: str, mode: str) -> Any:
    """``metrics -> float`` for ranking checkpoints: a NaN ranks worst (a NaN would make the
    sort, and so which checkpoint Orbax deletes, arbitrary)."""
    worst = math.inf if mode == "min" else -math.inf

    def value(metrics: Mapping[str, Any]) -> float:
        v = float(metrics[name])
        return v if math.isfinite(v) else worst

    return value


def checkpoint_options(tc: Mapping[str, Any], held_out: HeldOut | None
                       ) -> ocp.CheckpointManagerOptions:
    """Which checkpoints stay: the ``max_to_keep`` latest, ``keep_period``'s milestones, and
    with a held-out ``best_metric`` the one whose evaluation was best (Orbax keeps each
    checkpoint's metrics beside it, so a resumed run still knows it)."""
    keep: list[Any] = [ocp.checkpoint_managers.LatestN(n=int(tc["max_to_keep"]))]
    if tc["keep_period"]:
        keep.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=int(tc["keep_period"])))
    if held_out is None or not held_out.best_metric:
        return ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep), create=True)
    best_fn = _ranked_metric(held_out.best_metric, held_out.best_mode)
    keep.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=best_fn, reverse=held_out.best_mode == "min", n=1,
        keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=held_out.best_mode, create=True,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep))


def evaluate_held_out(eval_step: Any, params: Any, held_out: HeldOut, mesh: Mesh,
                      sample_step: Any = None) -> tuple[dict[str, float], np.ndarray | None]:
    """``(metrics, pictures)``: the mean of every metric over the held-out batches (equal
    sizes, so the mean over images; ``psnr`` from the mean MSE where there is one), and with
    a ``sample_step`` the first batch's first ``held_out.images`` faces beside their
    reconstructions, uint8 (n, H, 2W, 3). The same images and random draws every time, so
    evaluations at different steps compare."""
    it = make_train_iterator(held_out.data, mesh, source=held_out.source)
    key = jax.random.key(held_out.seed)
    sums: dict[str, Any] = {}
    pictures = None
    try:
        for i in range(held_out.batches):
            batch = next(it)
            m = eval_step(params, batch, jax.random.fold_in(key, i))
            sums = m if not sums else jax.tree.map(jnp.add, sums, m)
            if i == 0 and sample_step is not None:
                originals, recons = sample_step(params, batch,
                                                jax.random.fold_in(key, held_out.batches))
                recons = np.round(np.asarray(recons) * 255.0).astype(np.uint8)
                pictures = np.concatenate([np.asarray(originals), recons], axis=2)
    finally:
        it.close()
    out = {k: v / held_out.batches for k, v in _host_metrics(sums).items()}
    if "mse" in out:
        out["psnr"] = float(10 * np.log10(1.0 / max(out["mse"], 1e-12)))
    return out, pictures


def make_optimizer(tc: Mapping[str, Any]) -> optax.GradientTransformation:
    """Adam/AdamW, optional warmup + cosine decay, optional global-norm clipping.

    The hyper-parameters live in the optimizer state (``optax.inject_hyperparams``), so the
    compiled step does not depend on their values and :func:`set_hyperparams` can apply the
    config's values to a restored state.
    """
    lr: Any = float(tc["learning_rate"])
    if tc["schedule"] == "warmup_cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, lr, int(tc["warmup_steps"]), max(int(tc["steps"]), int(tc["warmup_steps"]) + 1),
            lr * float(tc["end_learning_rate_ratio"]))
    kw = dict(learning_rate=lr, b1=float(tc["b1"]), b2=float(tc["b2"]))
    if tc["optimizer"] == "adamw":
        opt = optax.inject_hyperparams(optax.adamw)(weight_decay=float(tc["weight_decay"]), **kw)
    else:
        opt = optax.inject_hyperparams(optax.adam)(**kw)
    if tc["grad_clip_norm"] > 0:
        opt = optax.chain(optax.clip_by_global_norm(float(tc["grad_clip_norm"])), opt)
    multipliers = {k: float(v) for k, v in dict(tc["lr_multipliers"]).items() if float(v) != 1.0}
    if multipliers:
        opt = scale_components(opt, multipliers)
    if tc["ema_decay"] > 0:
        opt = with_params_ema(opt, float(tc["ema_decay"]))
    return opt


def scale_components(inner: optax.GradientTransformation, factors: Mapping[str, float]
                     ) -> optax.GradientTransformation:
    """``inner`` with its updates of each top-level component of the params named in
    ``factors`` multiplied by that factor: a per-component learning rate (Adam's and AdamW's
    updates, weight decay included, are proportional to the rate). The state is ``inner``'s
    own, so checkpoints resume whatever the factors were."""

    def update(updates, state, params=None):
        updates, state = inner.update(updates, state, params)
        return {k: jax.tree.map(lambda u, f=factors[k]: u * jnp.asarray(f, u.dtype), v)
                if k in factors else v for k, v in updates.items()}, state

    return optax.GradientTransformation(inner.init, update)


def _check_lr_multipliers(tc: Mapping[str, Any], trainable: Any) -> None:
    """``train.lr_multipliers`` names trainable components and gives non-negative factors."""
    given = dict(tc["lr_multipliers"])
    unknown = sorted(set(given) - set(trainable))
    if unknown:
        raise TrainConfigError(f"config.train.lr_multipliers: {unknown} are not trainable "
                               f"components of this model; they are {sorted(trainable)}")
    for k, v in given.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise TrainConfigError(f"config.train.lr_multipliers.{k} must be a number >= 0, "
                                   f"got {v!r}")


class ParamsEmaState(NamedTuple):
    """An optimizer's state with a moving average of the params it updates beside it."""

    inner_state: Any
    count: jax.Array  # updates so far
    ema_params: Any


def with_params_ema(inner: optax.GradientTransformation, decay: float
                    ) -> optax.GradientTransformation:
    """``inner``, also keeping an exponential moving average of the params after each update.

    ``ema_t = (1 - w_t) ema_(t-1) + w_t p_t`` with ``w_t = (1 - decay) / (1 - decay^t)``:
    the average of the iterates p_1..p_t weighted by decay^(t-i) and normalised (Adam's bias
    correction), so it is a usable model from the first step (w_1 = 1) instead of being pulled
    toward the random init for ~1/(1-decay) steps. It lives in the optimizer state, so it is
    sharded like the params (:func:`_opt_shardings`), checkpointed and restored with them, and
    the train step is unchanged; :func:`ema_params` reads it.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    log_decay = math.log1p(-(1.0 - decay))  # in float64: 1 - decay^t as -expm1(t·log decay)

    def init(params):
        return _ema_started(inner.init(params), params)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("with_params_ema needs the params in update()")
        updates, inner_state = inner.update(updates, state.inner_state, params)
        count = optax.safe_increment(state.count)
        weight = jnp.where(count == 1, 1.0,  # exactly: the first average is the params
                           (1.0 - decay) / -jnp.expm1(count.astype(jnp.float32) * log_decay))
        new = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ((1 - weight) * e + weight * p).astype(e.dtype),
                           state.ema_params, new)
        return updates, ParamsEmaState(inner_state, count, ema)

    return optax.GradientTransformation(init, update)


def _ema_started(inner_state: Any, params: Any) -> ParamsEmaState:
    """The state :func:`with_params_ema` starts from: no updates yet, the average = ``params``
    (copied: the train step donates the params' buffers)."""
    return ParamsEmaState(inner_state, jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params))


def ema_params(opt_state: Any) -> Any:
    """The moving average of the trainable params in ``opt_state`` (None without one)."""
    return opt_state.ema_params if isinstance(opt_state, ParamsEmaState) else None


def _is_hyper(x: Any) -> bool:
    return isinstance(x, (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState))


def hyperparams(opt_state: Any) -> dict[str, Any]:
    """The current hyper-parameters (e.g. the scheduled learning rate) of ``opt_state``."""
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=_is_hyper) if _is_hyper(s)).hyperparams


def set_hyperparams(opt_state: Any, tc: Mapping[str, Any], mesh: Mesh) -> Any:
    """The config's constant hyper-parameters written into ``opt_state`` (e.g. after a restore:
    the config, not the checkpoint, says what the learning rate is from now on)."""
    values = {"b1": tc["b1"], "b2": tc["b2"]}
    if tc["schedule"] == "constant":  # a schedule recomputes the rate from the step count
        values["learning_rate"] = tc["learning_rate"]
    if tc["optimizer"] == "adamw":
        values["weight_decay"] = tc["weight_decay"]
    replicated = NamedSharding(mesh, PartitionSpec())
    values = {k: jax.device_put(np.float32(v), replicated) for k, v in values.items()}

    def one(s: Any) -> Any:
        if not _is_hyper(s):
            return s
        if set(values) - set(s.hyperparams):
            raise TrainConfigError(f"optimizer state has no hyper-parameters "
                                   f"{sorted(set(values) - set(s.hyperparams))}")
        return s._replace(hyperparams={**s.hyperparams, **values})

    return jax.tree.map(one, opt_state, is_leaf=_is_hyper)


def _boxed_abstract_params(model: Model) -> dict[str, Any]:
    """Per component, the shapes of its params *with* their logical-axis boxes (none for the
    hyperprior baseline: its few MB stay replicated, the batch is what is split)."""
    if not isinstance(model, fasdiff.FaSDiff):
        return {}
    key = jax.random.key(0)
    comp, hlfe = jax.eval_shape(lambda: model._init_compressor_hlfe(key, key))  # still boxed
    out = {"compressor": comp, "hlfe": hlfe}
    for name in ("unet", "vae", "controlnet", "identity"):
        mod = getattr(model, name)
        if mod is not None and hasattr(mod, "dummy_inputs"):
            out[name] = jax.eval_shape(lambda mod=mod: mod.init(key, *mod.dummy_inputs()))["params"]
    return out


def param_shardings(model: Model, params: Mapping[str, Any], mesh: Mesh,
                    rules: Any) -> dict[str, Any]:
    """NamedShardings for ``params`` from the modules' logical names and ``rules``.

    A component whose abstract tree does not match the real one (or that has no names) is
    replicated, so a module change can never give a wrong layout, only a replicated one.
    """
    abstract = _boxed_abstract_params(model)
    replicated = NamedSharding(mesh, PartitionSpec())
    out = {}
    for name, tree in params.items():
        boxed = abstract.get(name)
        if boxed is not None:
            unboxed = nn.unbox(boxed)
            same = (jax.tree.structure(unboxed) == jax.tree.structure(tree)
                    and all(a.shape == b.shape for a, b in zip(jax.tree.leaves(unboxed),
                                                               jax.tree.leaves(tree))))
            if same:
                out[name] = sharding.tree_shardings(boxed, mesh, rules)
                continue
            logging.warning("params[%r] does not match its module's init; replicating it", name)
        out[name] = jax.tree.map(lambda _: replicated, tree)
    return out


def _opt_shardings(optimizer: optax.GradientTransformation, opt_state_shape: Any,
                   train_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer-state leaves shaped like params share their param's sharding."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer, lambda _, s: s, opt_state_shape, train_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


@jax.jit
def _leaf_finite(tree: Any) -> Any:
    return jax.tree.map(lambda a: jnp.all(jnp.isfinite(a)), tree)


def _check_params_finite(train_params: Any, step: int) -> None:
    """Refuse to checkpoint non-finite params (e.g. a NaN update after a finite loss)."""
    flags = jax.device_get(_leaf_finite(train_params))
    bad = [jax.tree_util.keystr(path, simple=True, separator="/")
           for path, ok in jax.tree_util.tree_leaves_with_path(flags) if not ok]
    if bad:
        raise NonFiniteLossError(
            f"non-finite parameters after step {step} (not checkpointed): "
            + ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""),
            terms=("params",))


def _as_uint32(a: jax.Array) -> jax.Array:
    """A leaf's bits as uint32 words (narrower dtypes widened, 8-byte ones split in two)."""
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    width = a.dtype.itemsize
    if width < 4:
        narrow = {1: jnp.uint8, 2: jnp.uint16}[width]
        return jax.lax.bitcast_convert_type(a, narrow).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(a, jnp.uint32)


@jax.jit
def _leaf_sums(tree: Any) -> Any:
    """Per leaf: sum over i of bits_i * (2i + 1) mod 2**32. Integer sums wrap exactly in any
    order, so the value does not depend on sharding, device count or process count; a flipped
    bit 2**k at any i moves it by 2**k * (2i + 1), which is never 0 mod 2**32."""
    def one(a: jax.Array) -> jax.Array:
        bits = _as_uint32(a).reshape(-1)
        odd = jax.lax.iota(jnp.uint32, bits.size) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.sum(bits * odd, dtype=jnp.uint32)
    return jax.tree.map(one, tree)


def _named_sums(tree: Any) -> dict[str, int]:
    """``{"a/b/c": checksum}`` of every leaf (:func:`_leaf_sums`), for a checkpoint's meta."""
    sums = jax.device_get(_leaf_sums(tree))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): int(v)
            for path, v in jax.tree_util.tree_leaves_with_path(sums)}


def _check_sums(tree: Any, saved: Mapping[str, int] | None, workdir: str, step: int,
                what: str) -> None:
    """Refuse restored ``tree`` whose leaves differ from the checksums saved with them.
    Orbax/TensorStore keep no checksum of the array data: bytes flipped inside a data file
    were read back as other weights (a codec coded with them, silently)."""
    if not saved:  # checkpoints written before checksums were kept
        return
    got = _named_sums(tree)
    bad = sorted(k for k, v in saved.items() if k in got and got[k] != v)
    if bad:
        raise CheckpointError(
            f"{workdir}: checkpoint {step} is damaged: {what} "
            + ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            + " differ from the checksums saved with them (restore the folder from a copy, "
            "or use another step)")


def _weights_key(saved: Any, weights: str) -> str:
    """Where in checkpoint state the ``weights`` :func:`_chosen_weights` named are (and
    under which name their checksums are kept): ``"ema_params"`` or ``"params"``."""
    return "ema_params" if weights == "ema" and _has_ema(saved) else "params"


def _frozen_fingerprint(config: ml_collections.ConfigDict) -> str:
    """What the frozen parts are: a resume, codec or evaluate run with others is refused.
    Converted SD weights are named by their content (:func:`convert.sd_fingerprint`), so a
    run's checkpoints load wherever the folder is copied to; random ones by seed and config;
    both with the noise schedule the UNet denoises for (the SD folder's scheduler config
    under ``model.scheduler``)."""
    m = config.model
    if m.get("kind", "fasdiff") != "fasdiff":
        return m.kind  # nothing frozen; a FaSDiff workdir is refused by this too
    return _weights_fingerprint(config) + "+schedule-" + _fingerprint_of(
        fasdiff.schedule_arguments(fasdiff.schedule_settings(m)))[:8]


def _weights_fingerprint(config: ml_collections.ConfigDict) -> str:
    """The frozen weights' part of :func:`_frozen_fingerprint` (all of it in checkpoints
    saved before the schedule was named)."""
    m = config.model
    if m.get("sd_checkpoint", ""):
        from fasdiff_jax import convert

        return "sd-" + convert.sd_fingerprint(m.sd_checkpoint)[:16]
    return _fingerprint_of({"sd_checkpoint": "", "seed": config.seed,
                            "unet": m.unet.to_dict() if hasattr(m.unet, "to_dict") else m.unet,
                            "vae": m.vae.to_dict() if hasattr(m.vae, "to_dict") else m.vae})


def _fingerprint_of(src: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint_fits(saved: str | None, config: ml_collections.ConfigDict) -> bool:
    """``saved`` (a checkpoint's) names ``config``'s frozen parts. Older checkpoints are
    accepted as they were: those saved before the schedule was named by their weights alone
    (a schedule changed since is not seen), those saved before content fingerprints by the
    SD folder's path."""
    if saved == _frozen_fingerprint(config):
        return True
    if config.model.get("kind", "fasdiff") != "fasdiff" or not isinstance(saved, str):
        return False  # (a damaged meta's number is no fingerprint either)
    if "+schedule-" not in saved and saved == _weights_fingerprint(config):
        return True
    ckpt = config.model.get("sd_checkpoint", "")
    return bool(ckpt) and saved == _fingerprint_of({"sd_checkpoint": ckpt})


def _check_frozen(meta: Mapping[str, Any], config: ml_collections.ConfigDict, workdir: str,
                  step: int) -> None:
    """Refuse checkpoint ``step`` (its ``meta``) when trained on other frozen parts or as
    another model kind (resume, codec and evaluate alike), before its state is read."""
    if not _fingerprint_fits(meta.get("frozen"), config):
        raise TrainConfigError(
            f"{workdir}: checkpoint {step} was trained on other frozen SD weights or as another "
            f"model kind than this config's (fingerprint {meta.get('frozen')} != "
            f"{_frozen_fingerprint(config)}: model.kind, the weights in model.sd_checkpoint, "
            f"seed or SD config, or the noise schedule: the SD folder's "
            f"scheduler/scheduler_config.json under model.scheduler); use the config it was "
            f"trained with, or a fresh workdir")


def _workdir(path: str) -> str:
    """Local paths made absolute (``~`` expanded: the shell leaves it in ``--workdir=~/x``);
    URLs (``gs://bucket/run``, the TPU pod launch's shared workdir) left as they are: Orbax
    and CLU write to them through their own file systems. An empty one is refused: it was
    the current folder (a run trained into the repo's root)."""
    if not str(path).strip():
        raise TrainConfigError("--workdir is empty: name the run's folder")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _check_workdir(workdir: str) -> None:
    """A local workdir (or its nearest existing parent) must be a folder we can write in:
    otherwise Orbax's first makedirs failed with a bare NotADirectoryError traceback."""
    if "://" in workdir:
        return
    there = workdir
    while not os.path.exists(there):
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        raise TrainConfigError(f"workdir {workdir}: {there} is a file, not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise TrainConfigError(f"workdir {workdir}: {there} is not writable")


LOCK_FILE = "train.lock"


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Hold an exclusive lock on a local ``workdir`` while a run trains in it: a second run
    started on the same folder (a repeated launch, a resume while the first still runs) would
    save over the first one's checkpoints and config. ``flock`` dies with its process, so a
    killed run leaves no stale lock. Only process 0 locks (processes of one run share the
    folder) and tells the others whether it got the lock; URLs and file systems without
    ``flock`` (some NFS mounts) are not locked."""
    if "://" in workdir:
        yield
        return
    if jax.process_count() > 1:  # process 0 decides for all: the others would wait in the
        with _lock_on_process_0(workdir):  # first collective until the coordinator gave up
            yield
        return
    with _flock(workdir):
        yield


@contextlib.contextmanager
def _lock_on_process_0(workdir: str) -> Iterator[None]:
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        refused: FasdiffError | None = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(_flock(workdir))
            except FasdiffError as e:  # in use, or the lock file cannot be written
                refused = e
        if int(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))):
            raise refused or WorkdirInUseError(
                f"{workdir}: process 0 could not lock the workdir (another training run is "
                f"using it, or the lock cannot be written: see process 0's error)")
        yield


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
    import fcntl

    path = os.path.join(workdir, LOCK_FILE)
    for attempt in range(_LOCK_TRIES):
        made = [p for p in (workdir, path) if not os.path.exists(p)]
        with writing(path):
            os.makedirs(workdir, exist_ok=True)
            f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirInUseError(
                f"{workdir}: another training run is using this workdir ({holder}, lock "
                f"{path}); wait for it to end or stop it, or train in another workdir") from None
        except OSError as e:  # ENOLCK and the like: go on unlocked, as on a URL
            logging.warning("%s: cannot lock %s (%s); two runs on it are not kept apart",
                            workdir, path, e)
            locked = False
        if not locked or _same_file(f, path):
            break
        if attempt == _LOCK_TRIES - 1:  # removed under us each time: hold what we have
            logging.warning("%s: %s was replaced %d times while locking it; two runs on the "
                            "workdir may not be kept apart", workdir, path, _LOCK_TRIES)
            break
        f.close()  # locked a file the run before removed (below): a third would lock anew
    with f:
        if locked:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
        try:
            yield
        finally:
            if path in made and os.listdir(workdir) == [LOCK_FILE]:
                # a run refused before writing anything (a config the held-out or best-metric
                # checks reject) left a new workdir holding only its lock
                _remove_quietly(path, workdir if workdir in made else None)
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


_LOCK_TRIES = 8


def _same_file(f: Any, path: str) -> bool:
    """Whether the open file ``f`` is still what ``path`` names."""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except OSError:
        return False


def _remove_quietly(path: str, folder: str | None) -> None:
    try:
        os.remove(path)
        if folder is not None:
            os.rmdir(folder)
    except OSError:  # another run's lock may be there by now: leave it
        pass


MODEL_PATHS = ("sd_checkpoint", "identity_path")  # files ``config.model`` names


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the local files in :data:`MODEL_PATHS` made absolute (URLs kept): the
    saved run config and the frozen-weights fingerprint then name the same files from any
    working directory (a copy; ``config`` is left as it is)."""
    relative = {k: v for k in MODEL_PATHS if (v := config.model.get(k)) and "://" not in v
                and not os.path.isabs(v)}
    if not relative:
        return config
    config = config.copy_and_resolve_references()
    for k, v in relative.items():
        config.model[k] = os.path.abspath(v)
    return config


RUN_CONFIG = "config.json"


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Process 0 writes the config this run trains with, every ``--config.*`` override
    applied, to ``workdir/config.json``: the codec and evaluate commands rebuild the model
    from it, so a run trained with e.g. ``--config.model.sd_checkpoint=...`` needs no flags
    repeated. Written after a successful restore (a refused resume leaves the old one)."""
    if jax.process_index() != 0:
        return
    path = epath.Path(workdir) / RUN_CONFIG
    tmp = path.parent / f"{RUN_CONFIG}.tmp"
    try:
        with writing(str(path)):
            tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
            tmp.replace(path)
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """A write of ``what`` that fails for want of space or access becomes one
    :class:`WriteError` naming it and the cause (was: Orbax's ValueError or the OS's error
    with a traceback). Other errors (bugs) pass unchanged."""
    _drop_late_orbax_callbacks()
    try:
        yield
    except FasdiffError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        cause = write_failure(e)
        if cause is None:
            raise
        raise WriteError(f"{what}: cannot write ({cause[:300]}); what was complete before is "
                         f"kept: free space or fix the folder and rerun") from e


def _tree_bytes(tree: Any) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree))


# Beyond the arrays' bytes: metadata, the data iterator's state, a filesystem's block slack.
CHECKPOINT_MARGIN_BYTES = 1 << 20


def finish_save_and_check_space(mngr: ocp.CheckpointManager, workdir: str,
                                previous: int | None, at: int, need: int) -> None:
    """Wait for the background save of checkpoint ``previous`` (its failure is named as
    its own), then refuse checkpoint ``at`` where it cannot fit, before Orbax starts it: a
    save that ran out of space midway failed in Orbax's threads with 3,449 lines of
    tracebacks. The arrays' own bytes are the bound (zstd shrinks trained weights little;
    Orbax deletes old checkpoints only after the new one is complete). A bucket says nothing
    of its space. With several processes all hear of any process's failed write and the
    fullest file system decides, so all stop together: one process leaving alone would
    leave the others waiting in the next collective."""
    failure: Exception | None = None
    try:
        with writing(f"{workdir}: " + (f"checkpoint {previous}" if previous is not None
                                       else "a checkpoint")):
            mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - raised below, once the other processes know
        failure = e
    free = free_bytes(os.path.join(workdir, "checkpoints"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mine = np.array([-1.0 if free is None else free / 2**20, failure is not None],
                        np.float32)
        every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
        failed = [str(i) for i in np.flatnonzero(every[:, 1])]
        if failure is None and failed:
            who = listed(failed, ", ")
            raise WriteError(f"{workdir}: checkpoint {previous}: process {who} could "
                             f"not write its part (its own error says why); what was complete "
                             f"before is kept: free space or fix the folder and rerun")
        known = every[:, 0][every[:, 0] >= 0]
        free = int(float(known.min()) * 2**20) if known.size else None
    if failure is not None:
        raise failure
    need += CHECKPOINT_MARGIN_BYTES
    if free is not None and free < need:
        raise WriteError(
            f"{workdir}: checkpoint {at} needs about {need / 2**20:.1f} MiB and its file "
            f"system has {free / 2**20:.1f} MiB free; the checkpoints written before are "
            f"kept: free space and rerun to resume")


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples configs hold (shapes, channel lists, axis rules)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def load_run_config(workdir: str, advice: str = "pass the config it was trained with as "
                    "--config=FILE") -> ml_collections.ConfigDict:
    """The config :func:`save_run_config` wrote to ``workdir``; ``advice`` ends the message
    where there is none (the command's way out: its own flag, or none)."""
    path = epath.Path(_workdir(workdir)) / RUN_CONFIG
    if not path.exists():
        raise TrainConfigError(f"{workdir}: no {RUN_CONFIG} (not a training workdir, or one "
                               f"written before runs saved their config): {advice}")
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise TrainConfigError(f"{path}: not a readable config: {e}") from e
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        what = ("no model section" if isinstance(saved, dict)
                else f"it holds {json.dumps(saved)[:40]}, not a JSON object")
        if isinstance(saved, dict) and "_class_name" in saved:  # a converted model's folder
            advice = (f"it is a converted {saved['_class_name']} folder, not a run: a "
                      f"hyperprior folder is passed as --model_dir")
        raise TrainConfigError(f"{path}: not a run config ({what}): {advice}")
    return ml_collections.ConfigDict(_tuples(saved))


def _data_item(mngr: ocp.CheckpointManager, step: int) -> epath.Path:
    """Checkpoint ``step``'s Grain states: one ``process_I-of-N.json`` per process."""
    return mngr.directory / str(step) / "data"


def _saved_process_count(mngr: ocp.CheckpointManager, step: int) -> int | None:
    """How many processes wrote checkpoint ``step`` (one Grain state file each), or None."""
    data = _data_item(mngr, step)
    counts = set()
    if data.is_dir():
        for f in data.iterdir():
            m = re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name)
            if m:
                counts.add(int(m.group(1)))
    return counts.pop() if len(counts) == 1 else None


def _data_state_fits(mngr: ocp.CheckpointManager, step: int, workdir: str, policy: str) -> bool:
    """Whether the Grain iterator states of checkpoint ``step`` can be restored here.

    Each process saves its own position in its own shard of the data, so the states only mean
    something for the same number of processes; resuming a pod checkpoint on another slice
    size (or on one machine) raises, or with ``restart_data`` keeps params and optimizer state
    and starts each process's data stream afresh.
    """
    saved, now = _saved_process_count(mngr, step), jax.process_count()
    if saved == now:
        return True
    if policy == "restart_data":
        logging.warning("checkpoint %d was written by %s processes, this run has %d: params and "
                        "optimizer state resume, the data streams restart from their beginning",
                        step, saved, now)
        return False
    raise TrainConfigError(
        f"{workdir}: checkpoint {step} was written by {saved} processes, this run has {now}; "
        f"the data pipeline's position is saved per process and does not carry over to another "
        f"process count. Resume with {saved} processes, or pass "
        f"--config.train.on_process_count_change=restart_data to keep the params and optimizer "
        f"state and restart the data streams (the batches then differ from an uninterrupted run).")


def _warn_if_batch_order_changed(saved: Mapping[str, Any] | None, now: Mapping[str, Any],
                                 step: int, source: str) -> None:
    """A resumed data position is a batch count: over another number of records, seed, shuffle
    or batch size it names other images, so the run goes on but not as it would have."""
    if saved is None or dict(saved) == dict(now):  # None: saved before the order was kept
        return
    changed = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now)
                        if saved.get(k) != now.get(k))
    logging.warning("checkpoint %d was trained on another batch order than config.data now "
                    "gives (%s; source %s): the data stream resumes at the same batch count, "
                    "but which images each step gets differs from an uninterrupted run",
                    step, changed, source)


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


# The jitted steps of recent runs in this process, by :func:`_program_key`: a second run of
# the same programs (a resume, a notebook cell run again) calls the same jitted functions,
# so JAX neither traces nor lowers them again (a resume of the tiny config by 3 steps on
# this 2-core CPU: 18-19 s instead of 30-32 s, benchmarks/resume_in_process.py). A few
# entries: each holds its model (loss-network weights included).
_PROGRAMS: collections.OrderedDict[str, tuple] = collections.OrderedDict()
_PROGRAMS_KEPT = 4
# train settings that only the host loop reads; with a constant schedule the learning rate
# is optimizer state (``inject_hyperparams``), with a schedule it is part of the program
_LOOP_ONLY = ("x0_every", "log_every", "checkpoint_every", "max_to_keep", "keep_period",
              "profile_steps", "profile_first_step", "on_process_count_change")
_SCHEDULE_ONLY = ("learning_rate", "steps", "warmup_steps", "end_learning_rate_ratio")


def _program_key(config: ml_collections.ConfigDict, tc: Mapping[str, Any], mesh: Mesh,
                 rules: Any, held_out: HeldOut | None) -> str:
    """Everything the step programs are built from: the model config and its frozen
    weights' fingerprint (a converted SD folder by content, not by path: its config files
    shape the model), the train settings the step bakes in, the mesh (devices by id), the
    sharding rules, the batch axes and what the held-out steps compute."""
    skip = _LOOP_ONLY + (_SCHEDULE_ONLY if tc["schedule"] == "constant" else ())
    model = {k: v for k, v in config.model.to_dict().items() if k != "sd_checkpoint"}
    return json.dumps(dict(
        model=model, frozen=_frozen_fingerprint(config),
        train={k: v for k, v in tc.items() if k not in skip},
        mesh=[list(mesh.axis_names), list(mesh.devices.shape),
              [int(d.id) for d in mesh.devices.flat]],
        rules=rules, batch_axes=_batch_axes(config),
        held_out=None if held_out is None else [held_out.x0_terms, held_out.images],
    ), sort_keys=True, default=str)


def _batch_axes(config: ml_collections.ConfigDict) -> list[str]:
    """The mesh axes the input pipeline splits the batch over."""
    return list(config.data.get("batch_axes", DataConfig.batch_axes))


def params_gathered_over(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
    """The axes the train step gathers the params over (:func:`train_step.make_train_step`):
    the batch axes on a mesh that splits the batch over two or more axes while another axis
    is above 1, where XLA's own layout gives wrong gradients (jax-ml/jax#16894; tiny config
    at data=2, fsdp=2, tensor=2: 32-45% off); none elsewhere, where XLA's choice was right
    and, with fsdp alone, held less: the reduced SD-2.1 step at fsdp=8 compiled to 1054 MiB
    of temporaries per device vs 1333 MiB gathered (at 2x2x2: 902 vs 871 MiB)."""
    split = [a for a in batch_axes if mesh.shape.get(a, 1) > 1]
    other = [a for a in mesh.axis_names if a not in batch_axes and mesh.shape[a] > 1]
    return tuple(batch_axes) if len(split) >= 2 and other else ()


def _step_programs(config: ml_collections.ConfigDict, tc: Mapping[str, Any], mesh: Mesh,
                   rules: Any, held_out: HeldOut | None, model: Model,
                   optimizer: optax.GradientTransformation, p_sh: Any, o_sh: Any) -> tuple:
    """``(step_fns, eval_step, sample_step)``: the train step without and with the x̂0 terms
    (by ``x0``), and the held-out steps (None without evaluation); built once per
    :func:`_program_key` in this process."""
    key = _program_key(config, tc, mesh, rules, held_out)
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    gather = params_gathered_over(mesh, _batch_axes(config))
    step_fns = {x0: model.make_train_step(optimizer, x0, mesh=mesh, param_shardings=p_sh,
                                          opt_shardings=o_sh, microbatches=tc["microbatches"],
                                          gather_params_over=gather)
                for x0 in (False, True)}
    eval_step = sample_step = None
    if held_out is not None:
        eval_step = model.make_eval_step(held_out.x0_terms, mesh=mesh, param_shardings=p_sh)
        if held_out.images:
            sample_step = train_step.make_sample_step(model.reconstruct, held_out.images,
                                                      mesh=mesh, param_shardings=p_sh)
    programs = _PROGRAMS[key] = (step_fns, eval_step, sample_step)
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
        _PROGRAMS.popitem(last=False)
    return programs


def _check_image_size(config: ml_collections.ConfigDict, model: Model) -> None:
    """Training crops are whole multiples of the model's coarsest latent (the codec pads
    other sizes; a batch cannot): any other size failed inside the first step's trace with
    a shape error about broadcasting or the Haar transform. So did FaSDiff's high-frequency
    loss with more Haar levels than the training latent's side halves evenly."""
    size, multiple = int(config.data.image_size), int(model.multiple)
    if size < multiple or size % multiple:
        below = max(multiple, size // multiple * multiple)
        near = sorted({below, (size // multiple + 1) * multiple})
        raise TrainConfigError(
            f"config.data.image_size={size} is not a multiple of {multiple}, the side of this "
            f"model's coarsest latent cell; use {' or '.join(map(str, near))}")
    if isinstance(model, fasdiff.FaSDiff):
        latent = size >> model.compressor.vae_levels
        halvings = (latent & -latent).bit_length() - 1
        _check_int("model.loss.hf_levels", model.loss_cfg["hf_levels"], 1, halvings)


# Model settings an older configs/base.py also held at the top level, where nothing read them
# (--config.compute_dtype=bfloat16 trained in float32); the model's own fields count.
_MODEL_ONLY_DEFAULTS = {"compute_dtype": "float32", "remat": False, "attention_impl": "xla"}


def _check_model_only_fields(config: ml_collections.ConfigDict) -> None:
    """Refuse a top-level ``compute_dtype`` / ``remat`` / ``attention_impl`` that says other
    than ``config.model``'s (run configs saved by older versions hold equal copies)."""
    for k, default in _MODEL_ONLY_DEFAULTS.items():
        if k in config and config[k] != config.model.get(k, default):
            raise TrainConfigError(
                f"config.{k}={config[k]!r} is not read: the model's is config.model.{k} "
                f"({config.model.get(k, default)!r}); set --config.model.{k} instead")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train until ``config.train.steps`` (resuming from ``workdir``); the last logged metrics."""
    config = with_absolute_paths(config)
    tc = train_settings(config)
    if config.model.get("sd_checkpoint", "") is None:
        raise TrainConfigError(
            "config.model.sd_checkpoint is required by this config: a folder written by "
            "`python -m fasdiff_jax.convert` (pass --config.model.sd_checkpoint=DIR)")
    _check_model_only_fields(config)
    workdir = _workdir(workdir)
    _check_workdir(workdir)
    try:
        mesh = sharding.create_mesh(config.mesh.to_dict())
    except ValueError as e:
        raise TrainConfigError(f"config.mesh: {e}") from None
    rules = tuple(config.logical_axis_rules)
    logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size,
                 jax.process_count())

    new_run = _latest_checkpoint(os.path.join(workdir, "checkpoints")) is None
    model = build_model(config.model, new_run)
    _check_image_size(config, model)
    # then the training data: a bad source or too few epochs fail before anything compiles
    it = make_train_iterator(config.data, mesh)
    try:
        _check_epochs(config, int(tc["steps"]), it.order["records"])
        with workdir_lock(workdir):
            return _train(config, workdir, tc, mesh, rules, model, it)
    finally:
        it.close()


def _check_epochs(config: ml_collections.ConfigDict, steps: int, records: int) -> None:
    """With ``data.num_epochs`` set the stream ends; it must hold a batch for every step."""
    data = DataConfig.from_config(config.data)
    procs = jax.process_count()
    batches = stream_batches(data, records, procs)
    if batches is not None and batches < steps:
        raise TrainConfigError(
            f"config.data.num_epochs={data.num_epochs} gives {batches} batches of "
            f"{data.global_batch_size} ({records} records"
            f"{f' over {procs} processes' if procs > 1 else ''}), but config.train.steps="
            f"{steps} takes one a step; raise num_epochs, unset it (the records then repeat "
            f"for as long as the steps run) or lower the steps")


class InitialState(NamedTuple):
    """What the train loop starts from, and the layouts its steps keep."""

    params: Any  # trainable + frozen; on a resume the trainable leaves are shapes
    opt_state: Any  # on a resume shapes only
    optimizer: optax.GradientTransformation
    param_shardings: Any
    opt_shardings: Any


def initial_state(model: Model, tc: Mapping[str, Any], mesh: Mesh, rules: Any, seed: int,
                  resume: bool) -> InitialState:
    """A fresh run's params (drawn, SD parts loaded) and optimizer state, placed on their
    shardings. For a resume (``resume``) the trainable params and the optimizer state are
    ``jax.ShapeDtypeStruct``s with their shardings, the restore's target: the checkpoint
    replaces them, so nothing is drawn, copied (FaSDiff's ControlNet from the UNet),
    compiled or held for them; only the frozen parts are loaded and placed."""
    rng = jax.random.key(seed)
    if resume:
        params = {**model.trainable_shapes(), **model.frozen_params(rng)}
    else:
        params = model.init_params(rng)
    p_sh = param_shardings(model, params, mesh, rules)
    train_sh, frozen_sh = model.split(p_sh)
    _check_lr_multipliers(tc, train_sh)
    optimizer = make_optimizer(tc)
    opt_shape = jax.eval_shape(lambda p: model.init_opt_state(optimizer, p), params)
    o_sh = _opt_shardings(optimizer, opt_shape, train_sh, mesh)
    if resume:
        trainable, frozen = model.split(params)
        params = {**_abstract(trainable, train_sh), **jax.device_put(frozen, frozen_sh)}
        opt_state = _abstract(opt_shape, o_sh)
    else:
        params = jax.device_put(params, p_sh)
        opt_state = jax.jit(lambda p: model.init_opt_state(optimizer, p),
                            out_shardings=o_sh)(params)
    return InitialState(params, opt_state, optimizer, p_sh, o_sh)


def _latest_checkpoint(ckpt_dir: str) -> int | None:
    """The step a run in ``ckpt_dir`` resumes from, read without creating or cleaning
    anything (a config refused before the loop leaves nothing written). Every process asks
    at the same point: Orbax's managers synchronise the processes when they open."""
    probe = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False))
    try:
        return probe.latest_step()
    finally:
        probe.close()


def _train(config: ml_collections.ConfigDict, workdir: str, tc: Mapping[str, Any], mesh: Mesh,
           rules: Any, model: Model, it: Any) -> dict[str, float]:
    """Set up the model's state (:func:`initial_state`; a resume's comes from its checkpoint)
    and build its step programs, then :func:`_loop` over ``it``."""
    register_checkpoint_array_handler()
    held_out = held_out_settings(config, mesh, int(tc["steps"]))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resume_step = _latest_checkpoint(ckpt_dir)
    state = initial_state(model, tc, mesh, rules, config.seed, resume_step is not None)
    _check_microbatches(config, mesh, tc["microbatches"])
    step_fns, eval_step, sample_step = _step_programs(
        config, tc, mesh, rules, held_out, model, state.optimizer, state.param_shardings,
        state.opt_shardings)
    if held_out is not None:
        _check_best_metric(eval_step, state.params, held_out)
    mngr = ocp.CheckpointManager(ckpt_dir, options=checkpoint_options(tc, held_out))
    try:
        if mngr.latest_step() != resume_step:
            raise TrainConfigError(
                f"{workdir}: its checkpoints changed while this run started (latest step "
                f"{resume_step} -> {mngr.latest_step()}): is another run writing there?")
        return _loop(config, workdir, tc, mesh, model, state.params, state.opt_state,
                     state.opt_shardings, step_fns, it, mngr, held_out, eval_step, sample_step)
    finally:
        with writing(f"{workdir}: a checkpoint"):
            mngr.wait_until_finished()  # an async save of a good step completes even on error
        mngr.close()


# Orbax writes a replicated array "replica-parallel": each of its N holders writes 1/N of it,
# cut out by an eager slice (one compiled op per slice shape). For the many small leaves of
# a diffusion model that costs more than it saves. Saving the train state replicated on 8 CPU
# devices (benchmarks/checkpoint_save.py): tiny config 16.9 s first / 3.9 s later saves with
# Orbax's default, 2.0 / 1.6 s with this threshold; reduced SD-2.1 (787 MiB) 39.4 / 10.5 s
# vs 6.0 / 4.2 s.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def register_checkpoint_array_handler() -> None:
    """Orbax's handler for jax.Array, replica-parallel only from ``MIN_REPLICA_SLICE_BYTES``
    (without Orbax's warning that it replaces its default: that is the point)."""
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel("ERROR")
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
    finally:
        absl_logger.setLevel(level)


def _is_orbax_late_callback(unraisable: Any) -> bool:
    return (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed")


def _is_orbax_unretrieved_task(record: Any) -> bool:
    """asyncio's "Task exception was never retrieved" for a task of Orbax's (TensorStore's) reads."""
    if "Task exception was never retrieved" not in str(record.msg) or not record.exc_info:
        return False
    if "tensorstore" in str(record.exc_info[1]):  # a read awaited through asyncio's wrapper only:
        return True  # no frame of Orbax's or TensorStore's, but TensorStore's message and spec
    tb = record.exc_info[2]
    while tb is not None:
        if any(lib in tb.tb_frame.f_code.co_filename for lib in ("orbax", "tensorstore")):
            return True
        tb = tb.tb_next
    return False


# Where Orbax's modules live: their log records come from files under it.
ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep


def is_orbax_record(record: std_logging.LogRecord) -> bool:
    """A log record of Orbax's own (not one of a checkout that has "orbax" in its path)."""
    return record.pathname.startswith(ORBAX_DIR)


def _is_orbax_write_failure_log(record: Any) -> bool:
    """Orbax's own ERROR record (with its traceback) of a failed checkpoint write: the save
    in the main thread raises the same error, which :func:`writing` reports in one line."""
    if record.levelno < std_logging.ERROR or not is_orbax_record(record):
        return False
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and write_failure(exc) is not None


def _drop_late_orbax_callbacks() -> None:
    """When a read or a write fails, Orbax closes its event loop while TensorStore's other
    reads or writes are in flight; each of their completions then reports an "Event loop
    is closed" RuntimeError as unraisable from TensorStore's threads, read tasks that failed
    too are reported by asyncio's logger when collected, and Orbax logs a failed write with
    its traceback from each thread it passed through (a full disk during a save: 3,449
    lines around our one error line, 366 without the late callbacks). Drop exactly those;
    installed before reading or writing, since they may come before the error reaches us
    (they did under load)."""
    previous = sys.unraisablehook
    if getattr(previous, "_fasdiff_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_orbax_late_callback(unraisable):
            previous(unraisable)

    hook._fasdiff_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    std_logging.getLogger("asyncio").addFilter(lambda r: not _is_orbax_unretrieved_task(r))
    std_logging.getLogger("absl").addFilter(lambda r: not _is_orbax_write_failure_log(r))


@contextlib.contextmanager
def _reading(workdir: str, step: int) -> Iterator[None]:
    """Whatever Orbax/TensorStore raise while reading checkpoint ``step`` (ValueError,
    RuntimeError, OSError, JSON errors, with pages of async traces) becomes one
    :class:`CheckpointError` with the innermost message. Callers check first that the
    checkpoint fits the model, so what is left is damage."""
    _drop_late_orbax_callbacks()
    try:
        yield
    except Exception as e:  # noqa: BLE001 - see above
        root = e
        while root.__cause__ is not None:  # TensorStore's own message is the innermost one
            root = root.__cause__
        text = str(root).strip()
        first = text.splitlines()[0][:300] if text else ""
        raise CheckpointError(
            f"{workdir}: checkpoint {step} cannot be read ({type(root).__name__}: {first}): its "
            f"files are damaged or incomplete; restore an intact copy, or move "
            f"checkpoints/{step} aside to use the one before it") from e


def _saved_data_state(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """This process's Grain state in checkpoint ``step`` as Grain's handler wrote it; None when
    it cannot be read here (Grain's restore then names the fault)."""
    path = _data_item(mngr, step) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _restore(mngr: ocp.CheckpointManager, step: int, workdir: str, **items: Any) -> Any:
    with _reading(workdir, step):
        return mngr.restore(step, args=ocp.args.Composite(**items))


def _check_fits(want: Any, have: Any, workdir: str, step: int) -> None:
    """Refuse a checkpoint whose saved trainable params differ in names or shapes from the
    model's (another config), before anything is restored into it."""
    diff = layers.shape_differences(want, have)
    if diff:
        raise TrainConfigError(f"{workdir}: checkpoint {step} does not fit this config's "
                               f"model: {listed(diff)}")


def _loop(config: ml_collections.ConfigDict, workdir: str, tc: Mapping[str, Any], mesh: Mesh,
          model: Model, params: Any, opt_state: Any, o_sh: Any,
          step_fns: Mapping[bool, Any], it: Any, mngr: ocp.CheckpointManager,
          held_out: HeldOut | None = None, eval_step: Any = None,
          sample_step: Any = None) -> dict[str, float]:
    """Restore (if a checkpoint exists), then train, log, evaluate, check and save until the
    last step. On a resume the trainable leaves of ``params`` and all of ``opt_state`` are
    shapes with shardings (see :func:`initial_state`), the restore's target."""
    fingerprint = _frozen_fingerprint(config)
    step = 0
    latest = mngr.latest_step()
    if latest is not None:
        # fingerprint and shapes first: another model's state would fail inside Orbax, unreadably
        meta = _restore(mngr, latest, workdir, meta=ocp.args.JsonRestore())["meta"]
        if meta.get("export_of"):
            raise TrainConfigError(
                f"{workdir}: an export for coding of {meta['export_of']} (trained params "
                f"only, no optimizer or data state); training resumes in the run's own workdir")
        _check_frozen(meta, config, workdir, latest)
        target, frozen = model.split(params)
        saved = _saved_tree(mngr, latest, workdir)
        _check_fits(target, saved["params"], workdir, latest)
        if _has_ema(saved) and ema_params(opt_state) is None:
            raise TrainConfigError(
                f"{workdir}: checkpoint {latest} holds a moving average of the params, which "
                f"config.train.ema_decay=0 would drop; resume with a decay > 0, or start a "
                f"new workdir (python -m fasdiff_jax.codec export --workdir={workdir} "
                f"--weights=ema OUT keeps the average for coding)")
        starts_ema = ema_params(opt_state) is not None and not _has_ema(saved)
        items = dict(state=ocp.args.StandardRestore({
            "params": target,
            "opt_state": opt_state.inner_state if starts_ema else opt_state}))
        data_state = None  # set here when written with another data.num_workers
        if _data_state_fits(mngr, latest, workdir, tc["on_process_count_change"]):
            data_state = _saved_data_state(mngr, latest)
            if data_state is None or state_workers(data_state) == it.num_workers:
                data_state = None
                items["data"] = grain.checkpoint.CheckpointRestore(it.grain_iterator)
            _warn_if_batch_order_changed(meta.get("data_order"), it.order, latest,
                                         config.data.source)
        restored = _restore(mngr, latest, workdir, **items)
        if data_state is not None:
            it.set_state(data_state)  # converted to this run's worker count
            it.grain_iterator.start_prefetch()
            logging.info("checkpoint %d's data position was saved with data.num_workers=%s; "
                         "it resumes at the same batch with %d", latest,
                         state_workers(data_state), it.num_workers)
        sums = meta.get("sums", {})
        _check_sums(restored["state"]["params"], sums.get("params"), workdir, latest, "params")
        _check_sums(restored["state"]["opt_state"], sums.get("opt_state"), workdir, latest,
                    "optimizer state")
        params = {**restored["state"]["params"], **frozen}
        opt_state = restored["state"]["opt_state"]
        if starts_ema:  # switched on: the average starts from the restored params
            opt_state = jax.jit(_ema_started, out_shardings=o_sh)(opt_state,
                                                                  restored["state"]["params"])
            logging.warning("checkpoint %d has no moving average of the params: one starts "
                            "from its params (config.train.ema_decay=%s)", latest, tc["ema_decay"])
        step = int(meta["step"])
        logging.info("resumed from %s at step %d", workdir, step)
        if step >= tc["steps"]:  # said nothing, and saved this config over the run's
            logging.warning("checkpoint %d of %s is at or past config.train.steps=%d: nothing "
                            "to train (raise --config.train.steps to go on)", step, workdir,
                            tc["steps"])
            return {"step": step}
    opt_state = set_hyperparams(opt_state, tc, mesh)
    save_run_config(config, workdir)

    saved: list[int] = []  # this run's saves: the last may still be written in the background

    def save(at: int, eval_metrics: Mapping[str, float] | None = None) -> None:
        train_params = model.split(params)[0]
        _check_params_finite(train_params, at)
        sums = {"params": _named_sums(train_params), "opt_state": _named_sums(opt_state)}
        if ema_params(opt_state) is not None:  # also in opt_state; alone for the codec's read
            sums["ema_params"] = _named_sums(ema_params(opt_state))
        finish_save_and_check_space(mngr, workdir, saved[-1] if saved else None, at,
                                    _tree_bytes({"params": train_params, "opt_state": opt_state}))
        with writing(f"{workdir}: checkpoint {at}"):
            mngr.save(at, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": train_params, "opt_state": opt_state}),
                data=grain.checkpoint.CheckpointSave(it.grain_iterator),
                meta=ocp.args.JsonSave({"step": at, "frozen": fingerprint,
                                        "data_order": it.order, "sums": sums})),
                metrics=dict(eval_metrics) if eval_metrics else None)
        saved.append(at)
        logging.info("checkpoint %d: saving to %s/checkpoints/%d (in the background)", at,
                     workdir, at)

    # CLU's writers import TensorFlow (~10 s here): only training pays it, not the codec and
    # evaluate commands that import this module for restore_for_inference.
    from clu import metric_writers, periodic_actions

    writer = SummaryWriter(metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0), workdir)
    if step == 0:
        writer.write_hparams({k: v for k, v in flatten_dict(config.to_dict(), sep=".").items()
                              if isinstance(v, (int, float, str, bool))})
    report = periodic_actions.ReportProgress(num_train_steps=tc["steps"], writer=writer)
    base_rng = jax.random.key(config.seed)
    use_x0 = int(model.loss_cfg.get("stage", 1)) >= 2 and tc["x0_every"] > 0
    last: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    last_eval_params: dict[str, float] = {}  # eval.last_params_too: the last update's params
    keep_best = held_out is not None and bool(held_out.best_metric)
    best = _best_kept(mngr, held_out.best_metric, held_out.best_mode) if keep_best else None
    evaluated = False  # at the step the loop is on (the final save passes its metrics)
    trace = _StepTrace(workdir, tc["profile_first_step"], tc["profile_steps"])

    def held_out_eval() -> dict[str, float]:
        """Evaluate the params the loop is on (their moving average where kept) and log it
        at the step it is on; with ``eval.last_params_too`` the params themselves as well."""
        nonlocal last_eval_params
        started = time.monotonic()
        ema = ema_params(opt_state)
        with jax.profiler.StepTraceAnnotation("eval", step_num=step):
            got, pictures = evaluate_held_out(
                eval_step, params if ema is None else {**params, **ema}, held_out, mesh,
                sample_step)
            if ema is not None and held_out.last_params_too:
                last_eval_params = evaluate_held_out(eval_step, params, held_out, mesh)[0]
                writer.write_scalars(step, {f"eval_params/{k}": v
                                            for k, v in last_eval_params.items()})
        logging.info("step %d held-out: %s (%.1f s)", step, got, time.monotonic() - started)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in got.items()})
        if pictures is not None:  # left: the held-out face, right: its reconstruction
            writer.write_images(step, {"eval/reconstructions": pictures})
        return got

    with _Preemption() as preemption, metric_writers.ensure_flushes(writer), trace:
        if held_out is not None and held_out.at_start and step == 0:
            held_out_eval()  # the curves' starting point; no checkpoint, not a best candidate
        while step < tc["steps"]:
            x0 = use_x0 and (step + 1) % tc["x0_every"] == 0
            trace.before(step + 1)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                params, opt_state, metrics = step_fns[x0](
                    params, opt_state, next(it), jax.random.fold_in(base_rng, step))
            step += 1
            trace.after(step, metrics)
            report(step)
            if (x0 or step % tc["log_every"] == 0 or step % tc["checkpoint_every"] == 0
                    or step == tc["steps"]):
                last = _host_metrics(metrics)
                fasdiff.check_finite(last, step)
                last["learning_rate"] = float(hyperparams(opt_state)["learning_rate"])
                writer.write_scalars(step, {f"train/{k}": v for k, v in last.items()})
            evaluated = held_out is not None and step % held_out.every_steps == 0
            if evaluated:
                last_eval = held_out_eval()
                if keep_best:
                    best = _note_best(best, step, last_eval, held_out)
            if step != tc["steps"] and (step % tc["checkpoint_every"] == 0
                                        or (evaluated and keep_best)):
                save(step, last_eval if evaluated else None)
            if step < tc["steps"] and preemption.reached(mngr, step):
                logging.warning("preemption notice: saving step %d and stopping; the same "
                                "command resumes from there", step)
                stopped = {"stopped_by_signal": int(preemption.signum)}
                break
        else:
            stopped = {}
        if mngr.latest_step() != step:
            save(step, last_eval if evaluated else None)
    return {**last, **{f"eval/{k}": v for k, v in last_eval.items()},
            **{f"eval_params/{k}": v for k, v in last_eval_params.items()}, "step": step,
            **stopped}


class SummaryWriter:
    """The run's CLU writer, where a failed summary write is a warning and not the end of the
    run: an events file that could not be flushed (made read-only, a vanished NFS or GCS
    folder) ended training with CLU's AsyncError traceback, exit 1, and the steps since the
    last checkpoint lost. The loss lines still reach the log (CLU's log writer goes first),
    checkpoints are written as before (their own failures end the run, named), and a
    transient fault heals: each write is tried again. CLU's traceback per failed write (three
    at a time) is left out of the log; the warning names the cause."""

    def __init__(self, writer: Any, workdir: str):
        self._writer, self._workdir = writer, workdir
        self.failures = 0

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self._writer, method)(*args)
        except Exception as e:  # noqa: BLE001 - CLU's AsyncError wraps TensorFlow's or OSError
            cause = e
            while cause.__cause__ is not None:  # AsyncError from AsyncError from the fault
                cause = cause.__cause__
            if not (isinstance(cause, OSError)  # a bug (a TypeError, ...) is not a write fault
                    or type(cause).__module__.startswith("tensorflow.")):
                raise
            self.failures += 1
            if self.failures == 1:
                logging.warning("%s: the training summaries (TensorBoard events) cannot be "
                                "written (%s: %s); training goes on, the metric lines stay in "
                                "this log and checkpoints are saved as before", self._workdir,
                                type(cause).__name__, str(cause).splitlines()[0][:300])

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self._call("write_scalars", step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        self._call("write_images", step, images)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._call("write_hparams", hparams)

    def flush(self) -> None:
        self._call("flush")
        if self.failures:
            logging.warning("%s: %d summary writes failed in this run (see the first warning); "
                            "their metrics are in this log only", self._workdir, self.failures)
            self.failures = 0

    def close(self) -> None:
        self._call("close")


# Library log records that say nothing to the user of this loop: CLU's traceback from its
# writer thread, which :class:`SummaryWriter` turns into one warning; Orbax's warning on each
# save without held-out metrics while a best checkpoint is tracked (every checkpoint between
# evaluations, and a preemption's: by design, :func:`checkpoint_options` keeps those by age).
_QUIET_RECORDS = ("Error in producer thread for %s",
                  "Requested `tracked_metric`; did not provide metrics.")

std_logging.getLogger("absl").addFilter(lambda r: r.msg not in _QUIET_RECORDS)


def _best_kept(mngr: ocp.CheckpointManager, name: str, mode: str) -> tuple[int, float] | None:
    """``(step, value)`` of the kept checkpoint whose saved held-out metrics are best by
    ``name`` / ``mode`` (the earliest of equals), or None where none has it."""
    rank = _ranked_metric(name, mode)
    scored = {s: rank(m) for s in sorted(mngr.all_steps())
              if (m := mngr.metrics(s)) is not None and name in m}
    if not scored:
        return None
    step = (min if mode == "min" else max)(scored, key=lambda s: scored[s])
    return step, scored[step]


def _note_best(best: tuple[int, float] | None, step: int, metrics: Mapping[str, float],
               held_out: HeldOut) -> tuple[int, float]:
    value = _ranked_metric(held_out.best_metric, held_out.best_mode)(metrics)
    better = (best is None or (value < best[1] if held_out.best_mode == "min"
                               else value > best[1]))
    if better:
        logging.info("step %d: best held-out %s so far (%.6g); its checkpoint is kept "
                     "(--step=best)", step, held_out.best_metric, value)
        return step, value
    return best


class _StepTrace:
    """A ``jax.profiler`` trace of steps ``first .. first + count - 1`` into the workdir, where
    TensorBoard's profile plugin finds it; stopped however the loop ends."""

    def __init__(self, workdir: str, first: int, count: int) -> None:
        self._dir, self._first, self._last = workdir, first, first + count - 1
        self._on = False

    def before(self, step: int) -> None:
        if self._last >= self._first and step == self._first:
            jax.profiler.start_trace(self._dir)
            self._on = True

    def after(self, step: int, outputs: Any) -> None:
        if self._on and step >= self._last:
            jax.block_until_ready(outputs)  # the traced steps' device work, not only dispatch
            self._stop()
            logging.info("profile of steps %d-%d written to %s/plugins/profile", self._first,
                         self._last, self._dir)

    def _stop(self) -> None:
        self._on = False
        jax.profiler.stop_trace()

    def __enter__(self) -> "_StepTrace":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._on:
            self._stop()


class _Preemption:
    """Whether a preemption notice (SIGTERM: TPU VMs, SLURM, Kubernetes) has come; the loop
    then saves the step it is on and returns. One process: a SIGTERM (and first SIGINT)
    handler sets a flag while the loop runs. Several: JAX's coordination service turns
    SIGTERM into a sync point every process reaches at the same step
    (``mngr.reached_preemption``), so no Python handler goes in its way."""

    def __init__(self) -> None:
        self._raised = False
        self.signum = signal.SIGTERM  # the one that came (several processes: JAX's, SIGTERM)
        self._previous: dict[int, Any] = {}
        self._single = jax.process_count() == 1

    def __enter__(self) -> "_Preemption":
        if self._single and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        """SIGTERM, or a first Ctrl-C (which ended the run with a traceback, losing the steps
        since the last checkpoint): save the step the loop is on and stop. A second Ctrl-C
        stops at once."""
        self._raised, self.signum = True, signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            logging.warning("interrupted: the run saves the step it is on and stops (Ctrl-C "
                            "again stops it at once, without saving)")

    def reached(self, mngr: ocp.CheckpointManager, step: int) -> bool:
        return self._raised if self._single else mngr.reached_preemption(step)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def one_device_target(state_dir: Any) -> Any:
    """Abstract arrays, on this process's first device, for every leaf Orbax saved in
    ``state_dir``: a checkpoint written by any topology (a pod slice, 8 GPUs) then restores
    on one machine, where the saved shardings name devices that do not exist."""
    # the item's handler reads ``state_dir/_METADATA`` directly; StandardCheckpointer also
    # looks for step-level metadata there and logs a WARNING on every codec/evaluate run
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    tree = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        getattr(tree, "tree", tree))


def _saved_tree(mngr: ocp.CheckpointManager, step: int, workdir: str) -> Any:
    """:func:`one_device_target` of checkpoint ``step``'s state (from its metadata)."""
    with _reading(workdir, step):
        return one_device_target(mngr.directory / str(step) / "state")


def _has_ema(saved: Any) -> bool:
    """Whether a checkpoint's saved state tree holds a moving average of the params."""
    opt = saved.get("opt_state")
    return isinstance(opt, dict) and "ema_params" in opt


WEIGHTS = ("auto", "ema", "params")


def _chosen_weights(saved: Any, meta: Mapping[str, Any], weights: str | None, workdir: str,
                    step: int) -> str:
    """Which trained weights of checkpoint ``step`` to use: ``"ema"`` (the moving average,
    ``config.train.ema_decay``) or ``"params"`` (the last update's); ``"auto"``/None: the
    moving average where the run kept one. An export holds one of them, named in its meta."""
    weights = weights or "auto"
    if weights not in WEIGHTS:
        raise TrainConfigError(f"weights={weights!r}: expected one of {WEIGHTS}")
    if "opt_state" not in saved:  # an export for coding
        held = meta.get("weights", "params")
        if weights not in ("auto", held):
            raise TrainConfigError(f"{workdir}: an export of the run's {held!r} weights only; "
                                   f"the {weights!r} weights are in the run's own workdir")
        return held
    if weights == "auto":
        return "ema" if _has_ema(saved) else "params"
    if weights == "ema" and not _has_ema(saved):
        raise TrainConfigError(f"{workdir}: checkpoint {step} has no moving average of the "
                               f"params (train with config.train.ema_decay > 0)")
    return weights


def _read_params(mngr: ocp.CheckpointManager, step: int, workdir: str, saved: Any,
                 weights: str = "params") -> Any:
    """Only the trained params (``weights="ema"``: their moving average) of checkpoint
    ``step``'s state, not the optimizer state beside them (Adam's moments: twice the params'
    bytes); ``saved``: its :func:`_saved_tree`."""
    # an export holds the weights it names (meta) as its params
    path = (("opt_state", "ema_params") if _weights_key(saved, weights) == "ema_params"
            else ("params",))
    part = saved
    for key in path:
        part = part[key]
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(
        sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), part)
    item, args = part, restore_args
    for key in reversed(path):
        item, args = {key: item}, {key: args}
    with _reading(workdir, step):
        got = ocp.PyTreeCheckpointer().restore(
            mngr.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
    for key in path:
        got = got[key]
    return got


def _without_loss_networks(model_cfg: Any) -> Any:
    """Coding runs no loss: a FaSDiff config with its identity and LPIPS weights at 0, so
    dlib's and LPIPS' networks are not loaded (``model.identity_path``, a training-time file,
    need not exist where files are coded). Neither fingerprint depends on them."""
    if model_cfg.get("kind", "fasdiff") != "fasdiff":
        return model_cfg
    cfg = ml_collections.ConfigDict(fasdiff._as_dict(model_cfg))
    cfg.loss.identity = cfg.loss.lpips = 0.0
    return cfg


def _best_step(mngr: ocp.CheckpointManager, config: ml_collections.ConfigDict,
               workdir: str) -> int:
    """The kept checkpoint whose held-out evaluation was best by the run's
    ``eval.best_metric`` / ``best_mode``."""
    ec = _merged_section(config, "eval", EVAL_DEFAULTS, ())
    name = ec["best_metric"]
    best = _best_kept(mngr, name, ec["best_mode"]) if name else None
    if best is None:
        raise TrainConfigError(
            f"{workdir}: no checkpoint has held-out metrics{f' with {name!r}' if name else ''} "
            f"to pick the best by (runs with config.eval.source, every_steps and best_metric "
            f"set save them); give --step=N or leave --step out for the latest")
    return best[0]


def _open_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                     step: int | str | None) -> tuple[ocp.CheckpointManager, int]:
    """The workdir's checkpoint manager (the caller closes it) and the step ``step`` names:
    None the latest, ``"best"`` the best held-out evaluation's, else that step."""
    ckpt_dir = os.path.join(_workdir(workdir), "checkpoints")
    if epath.Path(ckpt_dir).exists() and not epath.Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir}: is a file, not the run's checkpoint folder")
    mngr = ocp.CheckpointManager(ckpt_dir) if epath.Path(ckpt_dir).is_dir() else None
    steps = sorted(mngr.all_steps()) if mngr is not None else []
    try:
        if not steps:
            raise TrainConfigError(f"{workdir}: no checkpoint to load (train first: "
                                   f"python -m fasdiff_jax.main --config=... --workdir={workdir})")
        if step == "best":
            step = _best_step(mngr, config, workdir)
        if step is not None and step not in steps:
            raise TrainConfigError(f"{workdir}: no checkpoint of step {step}; it has {steps} "
                                   f"(config.train.keep_period keeps more of them)")
    except TrainConfigError:
        if mngr is not None:
            mngr.close()
        raise
    return mngr, int(steps[-1] if step is None else step)


class Restored(NamedTuple):
    """What :func:`restore_for_inference` gives the codec and evaluate commands."""

    model: Model
    params: dict[str, Any]
    step: int
    weights: str  # "ema" or "params": which trained weights (see :func:`_chosen_weights`)


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          step: int | str | None = None, weights: str | None = None
                          ) -> Restored:
    """Frozen parts from the config, trained parts from checkpoint ``step`` (default: the
    latest; ``"best"``: the best held-out evaluation's, see ``config.eval.best_metric``) in
    ``workdir``; ``weights``: "ema" (the params' moving average), "params", or None/"auto"
    (the moving average where the run kept one); for the codec and evaluation commands (one
    host, no mesh)."""
    config = with_absolute_paths(config)
    mngr, step = _open_checkpoint(config, workdir, step)
    try:
        meta = _restore(mngr, step, workdir, meta=ocp.args.JsonRestore())["meta"]
        _check_frozen(meta, config, workdir, step)
        model, want = _model_of(config)
        saved = _saved_tree(mngr, step, workdir)
        weights = _chosen_weights(saved, meta, weights, workdir, step)
        _check_fits(want, saved["params"], workdir, step)
        got = _read_params(mngr, step, workdir, saved, weights)
        key = _weights_key(saved, weights)
        _check_sums(got, meta.get("sums", {}).get(key), workdir, step, key.replace("_", " "))
    finally:
        mngr.close()
    frozen = model.frozen_params(jax.random.key(config.seed))  # the trained parts: restored
    # host SD weights: put on the device once
    return Restored(model, jax.device_put({**got, **frozen}), step, weights)


def _check_export_folder(workdir: str, out: str) -> None:
    """An export goes to a new or empty folder outside the run: it wrote over another
    folder's config.json, and one inside the run's checkpoints folder became a damaged
    checkpoint that stopped the run's next resume."""
    there = epath.Path(out)
    if there.exists():
        if there.is_dir() and (there / "checkpoints").exists():
            raise TrainConfigError(f"{out}: already has checkpoints; export into a new folder")
        if not there.is_dir() or any(there.iterdir()):
            raise TrainConfigError(f"{out}: exists and is not an empty folder; export into a "
                                   f"new folder")
    if "://" not in out and "://" not in workdir:
        run, dst = os.path.realpath(workdir), os.path.realpath(out)
        if os.path.commonpath([run, dst]) == run:
            raise TrainConfigError(f"{out}: inside the run's workdir {workdir}; export to a "
                                   f"folder outside it")


def _model_of(config: ml_collections.ConfigDict) -> tuple[Model, Any]:
    """The model a saved or user-given config describes, and its trainable shapes. A field of
    the wrong type or a missing one (a hand-edited config.json) failed deep inside the model
    code with a KeyError or TypeError naming no field; here it is a :class:`TrainConfigError`."""
    try:
        model = build_model(_without_loss_networks(config.model), new_run=False)
        return model, model.trainable_shapes()
    except (KeyError, AttributeError, TypeError) as e:
        raise TrainConfigError(f"config.model cannot describe a model: a field is missing or "
                               f"of the wrong type ({type(e).__name__}: {e})") from e


def export_for_coding(workdir: str, out: str, step: int | str | None = None,
                      weights: str | None = None) -> tuple[int, str]:
    """Checkpoint ``step`` of a training run (as :func:`restore_for_inference` names it) as a
    workdir for the codec and evaluate commands: the run's ``config.json`` and that one
    checkpoint with one set of trained params (``weights`` as there; its meta names which), no
    optimizer or data state (with Adam a third of the bytes), a folder to share. Training does
    not resume from it (refused by name). Returns the step and the weights exported."""
    config = load_run_config(workdir)
    out = _workdir(out)  # Orbax takes absolute paths only (a relative --out always failed)
    _check_export_folder(workdir, out)
    mngr, step = _open_checkpoint(config, workdir, step)
    try:
        meta = _restore(mngr, step, workdir, meta=ocp.args.JsonRestore())["meta"]
        saved = _saved_tree(mngr, step, workdir)
        weights = _chosen_weights(saved, meta, weights, workdir, step)
        params = _read_params(mngr, step, workdir, saved, weights)
        key = _weights_key(saved, weights)
        _check_sums(params, meta.get("sums", {}).get(key), workdir, step, key.replace("_", " "))
    finally:
        mngr.close()
    meta = {**meta, "sums": {"params": _named_sums(params)},  # the export's params are these
            "export_of": f"{_workdir(workdir)}@{step}", "weights": weights}
    register_checkpoint_array_handler()
    if "://" in out or os.path.isdir(out):
        # An object store has no folder rename, and a folder the user made (empty: checked
        # above; maybe a link, a mount or with its own permissions) is kept: written in place,
        # and on failure emptied again (a half-written one was refused by every rerun).
        try:
            _write_export(out, out, step, params, meta, config)
        except BaseException:
            if "://" not in out:
                for entry in os.listdir(out):
                    path = os.path.join(out, entry)
                    with contextlib.suppress(OSError):
                        if os.path.isdir(path) and not os.path.islink(path):
                            shutil.rmtree(path)
                        else:
                            os.remove(path)
            raise
        return step, weights
    # A new folder is written next to ``out`` and renamed into place (a killed export's
    # temporary folder is removed first).
    remove_stale_temps(os.path.dirname(out), {os.path.basename(out)})
    tmp = temp_name(out)
    try:
        _write_export(tmp, out, step, params, meta, config)
        with writing(out):
            try:
                os.rename(tmp, out)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                    raise TrainConfigError(f"{out}: was made while this export ran (another "
                                           f"export to it?); export into a new folder") from e
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return step, weights


def _write_export(folder: str, out: str, step: int, params: Any, meta: Mapping[str, Any],
                  config: ml_collections.ConfigDict) -> None:
    """The export's one checkpoint (params and meta) and run config into ``folder`` (``out``
    or its temporary name; errors name ``out``)."""
    with writing(out):
        with ocp.CheckpointManager(os.path.join(folder, "checkpoints"),
                                   options=ocp.CheckpointManagerOptions(create=True)) as exported:
            exported.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta)))
            exported.wait_until_finished()
        try:
            save_run_config(config, folder)
        except WriteError as e:  # it names the file it wrote: name the export's instead
            raise WriteError(str(e).replace(folder, out)) from e
