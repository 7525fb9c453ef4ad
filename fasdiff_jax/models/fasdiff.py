"""The FaSDiff model: compressor + visual prompts + hybrid low-frequency enhancement + control
of a frozen SD UNet/VAE; losses, the trainable/frozen split, sampling and the codec API.

``model = build(config.model)``; ``params = model.init_params(rng)``;
``loss, metrics = model.loss_fn(params, batch, rng)``; ``model.compress(params, img) -> bytes``;
``model.decompress(params, data) -> img``. Data flow: x -> frozen VAE -> z0; compressor(x,
z0) -> bits -> (visual prompt p, coarse latent ẑ); HLFE(ẑ, p) -> UNet scale/shift; ControlNet
(z_t, p) -> UNet residuals; frozen UNet denoises. Choices the paper's abstract does not fix
are ours and are config fields:

* ``z0`` is the VAE posterior *mean* times ``scaling_factor`` (deterministic target);
* the high-frequency loss compares Haar high bands of ẑ and ``z0`` (latent space, every step);
* identity and LPIPS run on the one-step x̂0 decoded by the VAE, only when
  ``loss.x0_terms`` is on (stage 2, or every ``x0_every`` steps in the train loop); on those
  steps every sample's ``t`` is drawn from ``[0, x0_max_timestep]``, where the one-step x̂0
  is informative (drawing from all t and masking would decode images that count for
  nothing); the identity chip of an aligned face is the
  fixed box ``identity_crop`` (top, left, size as fractions), resized to dlib's 150x150;
* the empty-prompt embedding comes from the converted checkpoint; a random-weights model
  (tiny configs) uses a fixed seeded random embedding instead.

Params: ``{'compressor', 'hlfe', 'controlnet'}`` are trained; ``{'unet', 'vae',
'null_text', 'identity', 'lpips'}`` are frozen (:meth:`FaSDiff.trainable_mask`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from fasdiff_jax import convert
from fasdiff_jax.coding import container as ct
from fasdiff_jax.coding.errors import BitstreamError
from fasdiff_jax.data.pipeline import to_model_input
from fasdiff_jax.diffusion import samplers, schedules
from fasdiff_jax.errors import ConversionError, FasdiffError, NonFiniteLossError, listed
from fasdiff_jax.models import hyperprior as H
from fasdiff_jax.models import identity as identity_lib
from fasdiff_jax.models import layers, perceptual, train_step, wavelets
from fasdiff_jax.models import entropy
from fasdiff_jax.models.compressor import HFCompressor
from fasdiff_jax.models.enhancement import HybridLowFrequencyEnhancement
from fasdiff_jax.models.sd import controlnet as controlnet_lib
from fasdiff_jax.models.sd.unet import UNet2DConditionModel, per_block
from fasdiff_jax.models.sd.vae import AutoencoderKL

CODEC_ID = 2
TRAINABLE = ("compressor", "hlfe", "controlnet")
FROZEN = ("unet", "vae", "null_text", "identity", "lpips")
Params = dict[str, Any]
# ControlNet fields that are not copied from the UNet (built in :func:`build`).
_CONTROL_ONLY = ("conditioning_channels", "conditioning_downsample",
                 "conditioning_embedding_out_channels")


def unet_skip_targets(unet: UNet2DConditionModel) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, stride) of every UNet skip feature (diffusers' order) and of the mid block."""
    n = len(unet.block_out_channels)
    nlayers = per_block(unet.layers_per_block, n, "layers_per_block")
    out = [(unet.block_out_channels[0], 1)]
    for i, c in enumerate(unet.block_out_channels):
        out += [(c, 2**i)] * nlayers[i]
        if i < n - 1:
            out.append((c, 2 ** (i + 1)))
    return out, (unet.block_out_channels[-1], 2 ** (n - 1))


def frozen_probe_shapes(unet: UNet2DConditionModel, vae: AutoencoderKL) -> dict[str, tuple]:
    """Shapes the config fixes for the frozen SD parts' outer convolutions (channels in and
    out, kernel sizes), by path: enough to refuse another SD's weights by name before flax
    does, without tracing the UNet and VAE (~1.1 s at SD-2.1's size)."""
    b, lat = vae.block_out_channels, vae.latent_channels
    k_in, k_out = unet.conv_in_kernel, unet.conv_out_kernel
    want = {"vae/encoder/conv_in/kernel": (3, 3, vae.in_channels, b[0]),
            "vae/encoder/conv_out/kernel": (3, 3, b[-1], 2 * lat),
            "vae/decoder/conv_in/kernel": (3, 3, lat, b[-1]),
            "vae/decoder/conv_out/kernel": (3, 3, b[0], vae.out_channels),
            "unet/conv_in/kernel": (k_in, k_in, unet.in_channels, unet.block_out_channels[0]),
            "unet/conv_out/kernel": (k_out, k_out, unet.block_out_channels[0], unet.out_channels)}
    if vae.use_quant_conv:
        want["vae/quant_conv/kernel"] = (1, 1, 2 * lat, 2 * lat)
    if vae.use_post_quant_conv:
        want["vae/post_quant_conv/kernel"] = (1, 1, lat, lat)
    return want


def _frozen_differences(want: Mapping[str, tuple], params: Params) -> list[str]:
    """:func:`layers.shape_differences`' lines for the leaves ``want`` names."""
    out = []
    for path, shape in want.items():
        node: Any = params
        for key in path.split("/"):
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            out.append(f"missing {path}")
        elif tuple(np.shape(node)) != shape:
            out.append(f"{path}: {tuple(np.shape(node))} != {shape}")
    return out


def _as_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def check_finite(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming every loss term that is NaN or Inf."""
    bad = {k: float(v) for k, v in metrics.items()
           if np.ndim(v) == 0 and not np.isfinite(float(v))}
    if bad:
        where = "" if step is None else f" at step {step}"
        raise NonFiniteLossError(
            f"non-finite loss terms{where}: "
            + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())), terms=tuple(sorted(bad)))


@dataclasses.dataclass
class FaSDiff:
    """Modules plus the config that ties them; all methods are pure in ``params``."""

    cfg: dict
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    controlnet: controlnet_lib.ControlNetModel
    compressor: HFCompressor
    hlfe: HybridLowFrequencyEnhancement
    schedule: schedules.Schedule
    identity: nn.Module | None
    lpips: nn.Module | None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ sizes
    @property
    def vae_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def multiple(self) -> int:
        return self.compressor.multiple

    @property
    def loss_cfg(self) -> dict:
        return self.cfg["loss"]

    # ------------------------------------------------------------------ params
    def init_params(self, rng: jax.Array) -> Params:
        """Random trainable parts; SD parts from ``sd_checkpoint`` when the config names one.

        The loaded SD parts (UNet, VAE, the ControlNet's copy of the UNet encoder, null text)
        stay host numpy: ``jax.device_put(params, shardings)`` in the train loop puts each
        device's shard there straight from the file, with no full copy on a default device."""
        frozen = self.frozen_params(rng)
        r = jax.random.split(rng, 6)
        control_only = {f: getattr(self.controlnet, f) for f in _CONTROL_ONLY}
        _, cn_params = controlnet_lib.controlnet_from_unet(self.unet, frozen["unet"], rng=r[2],
                                                           **control_only)
        # 'rbg' keys for init: XLA:CPU compiles threefry init graphs ~4x slower (22 s vs 6 s
        # for the tiny compressor); the init distribution is the same.
        seeds = jax.random.randint(r[3], (2,), 0, 2**31 - 1)
        comp, hlfe = jax.jit(lambda s: self._init_compressor_hlfe(
            jax.random.key(s[0], impl="rbg"), jax.random.key(s[1], impl="rbg")))(seeds)
        return {"compressor": nn.unbox(comp), "hlfe": nn.unbox(hlfe), "controlnet": cn_params,
                **frozen}

    def frozen_params(self, rng: jax.Array) -> Params:
        """The frozen parts exactly as :meth:`init_params` makes them from ``rng`` (SD weights
        from ``sd_checkpoint``, or drawn), without initialising the trainable ones: all that
        inference needs besides a checkpoint (no ControlNet copy, no init compile)."""
        r = jax.random.split(rng, 6)
        ckpt = self.cfg.get("sd_checkpoint") or ""
        if ckpt:
            unet_params, vae_params, null = _load_sd_checkpoint(self, ckpt)
        else:
            seed = int(jax.random.randint(r[0], (), 0, 2**31 - 1))
            unet_params = convert.random_params(self.unet, seed)
            vae_params = convert.random_params(self.vae, seed + 1)
            null = jax.random.normal(jax.random.key(1234), (
                1, self.cfg["text_length"], self.unet.cross_attention_dim)) * 0.5
        params: Params = {"unet": unet_params, "vae": vae_params,
                          "null_text": np.asarray(null, np.float32)}
        if self.identity is not None:
            params["identity"] = self._cache["identity_params"]
        if self.lpips is not None:
            params["lpips"] = self._cache["lpips_params"]
        return params

    def trainable_shapes(self) -> Params:
        """Shapes and dtypes of :meth:`init_params`' trainable parts (traced, nothing drawn
        or compiled): what a checkpoint is checked against."""
        shapes = self._cache.get("trainable_shapes")
        if shapes is None:  # traced once per model: 0.7-1.3 s at SD-2.1's size
            key = jax.random.key(0, impl="rbg")
            comp, hlfe = jax.eval_shape(lambda: self._init_compressor_hlfe(key, key))
            shapes = {"compressor": nn.unbox(comp), "hlfe": nn.unbox(hlfe),
                      "controlnet": convert.abstract_params(self.controlnet)}
            self._cache["trainable_shapes"] = shapes
        return shapes

    def _init_compressor_hlfe(self, k_comp: jax.Array, k_hlfe: jax.Array) -> tuple[Any, Any]:
        size = self.cfg["image_size"]
        lat = size // self.vae_factor
        x = jnp.zeros((1, size, size, 3))
        z = jnp.zeros((1, lat, lat, self.vae.latent_channels))
        p = jnp.zeros((1, lat, lat, self.compressor.prompt_channels))
        return (self.compressor.init(k_comp, x, z, "round")["params"],
                self.hlfe.init(k_hlfe, z, p)["params"])

    @staticmethod
    def trainable_mask(params: Params) -> Params:
        """True for trained leaves (compressor, HLFE, control), False for frozen SD/metric nets."""
        return {k: jax.tree.map(lambda _: k in TRAINABLE, v) for k, v in params.items()}

    @staticmethod
    def split(params: Params) -> tuple[Params, Params]:
        return ({k: v for k, v in params.items() if k in TRAINABLE},
                {k: v for k, v in params.items() if k not in TRAINABLE})

    # ------------------------------------------------------------------ pieces
    def encode_z0(self, params: Params, x: jax.Array) -> jax.Array:
        mean, _ = self.vae.apply({"params": params["vae"]}, x, method="encode")
        return jax.lax.stop_gradient(mean * self.vae.scaling_factor)

    def decode_latent(self, params: Params, z: jax.Array) -> jax.Array:
        return self.vae.apply({"params": params["vae"]}, z / self.vae.scaling_factor,
                              method="decode")

    def denoise(self, params: Params, z_t: jax.Array, t: jax.Array, prompt: jax.Array,
                modulation: Mapping[str, Any]) -> jax.Array:
        """UNet output with control residuals from the visual prompt and HLFE modulation."""
        ctx = jnp.broadcast_to(params["null_text"], (z_t.shape[0],) + params["null_text"].shape[1:])
        down, mid = self.controlnet.apply(
            {"params": params["controlnet"]}, z_t, t, ctx, prompt,
            self.cfg["control"]["conditioning_scale"])
        return self.unet.apply({"params": params["unet"]}, z_t, t, ctx, down, mid, modulation)

    # ------------------------------------------------------------------ training
    def loss_fn(self, params: Params, batch: Mapping[str, jax.Array] | jax.Array, rng: jax.Array,
                x0_terms: bool | None = None, quantization: str = "noise"
                ) -> tuple[jax.Array, dict]:
        """Total loss and every term. ``batch['image']``: uint8 (B,H,W,3), H, W multiples of
        :attr:`multiple`. ``x0_terms`` (static) adds identity + LPIPS; default: stage 2.
        ``quantization``: the latents' ``"noise"`` (training) or ``"round"`` (what coding
        does: held-out evaluation, where bpp is then the model's estimate of the file)."""
        lc = self.loss_cfg
        if x0_terms is None:
            x0_terms = lc["stage"] >= 2
        img = batch["image"] if isinstance(batch, Mapping) else batch
        x = to_model_input(img)
        b, hgt, wid, _ = x.shape
        r_q, r_t, r_n = jax.random.split(rng, 3)
        z0 = self.encode_z0(params, x)
        prompt, z_coarse, y_lik, z_lik = self.compressor.apply(
            {"params": params["compressor"]}, x, z0, quantization, r_q)
        bpp = entropy.bits_from_likelihoods(y_lik, z_lik) / (b * hgt * wid)
        modulation, _ = self.hlfe.apply({"params": params["hlfe"]}, z_coarse, prompt)
        with_x0 = x0_terms and (lc["identity"] > 0 or lc["lpips"] > 0)
        t_max = lc["x0_max_timestep"] + 1 if with_x0 else self.schedule.num_train_timesteps
        t = jax.random.randint(r_t, (b,), 0, min(t_max, self.schedule.num_train_timesteps))
        noise = jax.random.normal(r_n, z0.shape)
        z_t = schedules.add_noise(self.schedule, z0, noise, t)
        out = self.denoise(params, z_t, t, prompt, modulation).astype(jnp.float32)
        target = (schedules.get_velocity(self.schedule, z0, noise, t)
                  if self.schedule.prediction_type == "v_prediction" else noise)
        metrics = {
            "bpp": bpp,
            "diffusion": jnp.mean((out - target) ** 2),
            "latent": jnp.mean((z_coarse - z0) ** 2),
            "high_freq": wavelets.high_frequency_loss(z_coarse, z0, lc["hf_levels"]),
        }
        loss = (lc["rate"] * bpp + lc["diffusion"] * metrics["diffusion"]
                + lc["latent"] * metrics["latent"] + lc["high_freq"] * metrics["high_freq"])
        if with_x0:
            x0 = schedules.predict_x0(self.schedule, out, z_t, t)
            x_hat = jnp.clip(self.decode_latent(params, x0), -1.0, 1.0)
            if lc["identity"] > 0:
                metrics["identity"] = jnp.mean(1 - self._identity_cosine(params, x, x_hat))
                loss = loss + lc["identity"] * metrics["identity"]
            if lc["lpips"] > 0:
                metrics["lpips"] = jnp.mean(self.lpips.apply({"params": params["lpips"]},
                                                             x_hat, x))
                loss = loss + lc["lpips"] * metrics["lpips"]
        metrics["loss"] = loss
        return loss, metrics

    def _identity_cosine(self, params: Params, x: jax.Array, x_hat: jax.Array) -> jax.Array:
        box = self.loss_cfg["identity_crop"]
        embed = lambda im: self.identity.apply(  # noqa: E731
            {"params": params["identity"]}, identity_lib.aligned_face_chips(im, box))
        return identity_lib.identity_cosine(embed(x_hat), jax.lax.stop_gradient(embed(x)))

    def make_train_step(self, optimizer: optax.GradientTransformation, x0_terms: bool | None = None,
                        mesh: Mesh | None = None, param_shardings: Any = None,
                        opt_shardings: Any = None, microbatches: int = 1,
                        gather_params_over: Sequence[str] = ()) -> Callable:
        """:func:`~fasdiff_jax.models.train_step.make_train_step` of :meth:`loss_fn` (the
        SD/metric networks frozen); ``opt_state`` comes from :meth:`init_opt_state`. Pass
        trees from :func:`fasdiff_jax.sharding.tree_shardings` as shardings to shard."""
        return train_step.make_train_step(
            lambda p, batch, rng: self.loss_fn(p, batch, rng, x0_terms), self.split, optimizer,
            mesh, param_shardings, opt_shardings, microbatches=microbatches,
            gather_params_over=gather_params_over)

    def make_eval_step(self, x0_terms: bool | None = None, mesh: Mesh | None = None,
                       param_shardings: Any = None) -> Callable:
        """``eval_step(params, batch, rng) -> metrics``: :meth:`loss_fn`'s terms with rounded
        latents (as coded), for held-out batches; the train loop passes a fixed ``rng`` so
        every evaluation draws the same timesteps and noise."""
        return train_step.make_eval_step(
            lambda p, batch, rng: self.loss_fn(p, batch, rng, x0_terms, "round"), mesh,
            param_shardings)

    def reconstruct(self, params: Params, images: jax.Array, rng: jax.Array) -> jax.Array:
        """uint8 (B,H,W,3) -> float [0, 1]: what decoding makes of them (latents rounded, the
        config's sampler), traceable, for the held-out pictures the train loop logs. Not the
        codec's exact pixels: files take their means and scales from the integer h_s."""
        spec = self.sampler_spec()
        x = to_model_input(images)
        z0 = self.encode_z0(params, x)
        prompt, z_coarse, _, _ = self.compressor.apply({"params": params["compressor"]}, x, z0,
                                                       "round")
        z = self.sample(params, prompt, z_coarse, rng, spec.steps, spec.t_start, spec.eta)
        return jnp.clip((self.decode_latent(params, z) + 1.0) / 2.0, 0.0, 1.0)

    def init_opt_state(self, optimizer: optax.GradientTransformation, params: Params):
        return optimizer.init(self.split(params)[0])

    # ------------------------------------------------------------------ sampling
    def sample(self, params: Params, prompt: jax.Array, z_coarse: jax.Array, rng: jax.Array,
               steps: int, t_start: int = 0, eta: float = 0.0) -> jax.Array:
        """DDIM from noise (``t_start`` 0) or from ẑ noised to ``t_start``; returns a latent."""
        modulation, _ = self.hlfe.apply({"params": params["hlfe"]}, z_coarse, prompt)
        r_init, r_steps = jax.random.split(rng)
        noise = jax.random.normal(r_init, z_coarse.shape, jnp.float32)
        if t_start:
            t0 = int(schedules.ddim_timesteps(self.schedule, steps, t_start)[0])
            x = schedules.add_noise(self.schedule, z_coarse, noise, t0)
        else:
            x = noise
        fn = lambda z, t: self.denoise(params, z, t, prompt, modulation)  # noqa: E731
        return samplers.ddim_sample(fn, self.schedule, x, steps, rng=r_steps, eta=eta,
                                    t_start=t_start or None)

    # ------------------------------------------------------------------ codec
    def _fingerprint_head(self, wrapped: Params) -> Any:
        h = hashlib.blake2b(H.prepare(self.compressor, wrapped).fingerprint, digest_size=16)
        h.update(repr(sorted((k, v) for k, v in self.cfg.items()
                             if k in ("unet", "vae", "hlfe", "control", "scheduler"))).encode())
        return h

    def check_params_fit(self, params: Params) -> None:
        """Refuse params of another config by name (a part missing, trained parts of other
        shapes): they failed inside flax (ScopeParamShapeError, KeyError) after the device
        work began, or (decompress) as a misleading fingerprint mismatch. Of the frozen SD
        parts only the outer convolutions the config fixes are checked
        (:func:`frozen_probe_shapes`; tracing all their shapes costs ~1.1 s at SD-2.1's
        size), the loss networks not at all: coding does not use them."""
        if not isinstance(params, Mapping):
            raise ConversionError(f"params: expected the dict init_params returns, got "
                                  f"{type(params).__name__}")
        coding = (*TRAINABLE, "unet", "vae", "null_text")
        absent = [k for k in coding if k not in params]
        if absent:
            raise ConversionError(f"params lack {', '.join(absent)} (FaSDiff codes with "
                                  f"{', '.join(coding)})")
        want = self.trainable_shapes()
        diff = layers.shape_differences(want, {k: params[k] for k in want})
        diff += _frozen_differences(frozen_probe_shapes(self.unet, self.vae), params)
        diff += self.null_text_differences(params["null_text"])
        if diff:
            raise ConversionError(f"params do not fit this FaSDiff config: {listed(diff)}")

    def null_text_differences(self, null: Any) -> list[str]:
        """``["null_text: (shape) != (1, L, width)"]`` where the empty-prompt embedding does
        not fit the UNet's cross-attention width (any prompt length L), else ``[]``."""
        shape, width = tuple(np.shape(null)), self.unet.cross_attention_dim
        if len(shape) != 3 or shape[0] != 1 or shape[2] != width:
            return [f"null_text: {shape} != (1, L, {width})"]
        return []

    def _prepared(self, params: Params):
        """(hyperprior coder, this model's fingerprint, compressor params wrapped once).

        The fingerprint covers the compressor's (via its coder), the config's and every
        other weight but the loss networks': sha256 per array on a thread pool (hashlib
        releases the GIL), the digests then hashed in order. Cached here per params object;
        the coder comes from ``H.prepare``, whose own cache follows where the integer h_s
        runs."""
        hit = self._cache.get("prep")
        if (hit is None or hit[0] != id(params) or hit[1] is not params
                or not H.holds_same_arrays(params, hit[4])):
            self.check_params_fit(params)
            self._cache.pop("fp1", None)
            wrapped = {"params": params["compressor"]}  # one object, so H.prepare's cache hits
            h = self._fingerprint_head(wrapped)
            h.update(FINGERPRINT_SCHEME)
            leaves = [leaf for name in FINGERPRINTED for leaf in jax.tree.leaves(params[name])]
            for shape, digest in zip((np.shape(x) for x in leaves), _array_digests(leaves)):
                h.update(repr(shape).encode() + digest)
            hit = (id(params), params, h.digest(), wrapped,
                   H.freeze_host_arrays(jax.tree.leaves(params)))
            self._cache["prep"] = hit
        return H.prepare(self.compressor, hit[3]), hit[2], hit[3]

    def fingerprint(self, params: Params) -> bytes:
        """What this model's files carry to refuse other weights (16 bytes; ``codec info``
        prints it): evaluation results name the weights by it."""
        return self._prepared(params)[1]

    def _first_fingerprint(self, params: Params) -> bytes:
        """The fingerprint files carried before :data:`FINGERPRINT_SCHEME`: one blake2b
        stream over every array (one core, ~0.95 GB/s here); computed only for such a file."""
        hit = self._cache.get("fp1")
        if hit is None or hit[0] is not params:
            h = self._fingerprint_head(self._prepared(params)[2])
            for name in FINGERPRINTED:
                for leaf in jax.tree.leaves(params[name]):
                    h.update(np.ascontiguousarray(np.asarray(leaf, "<f4")))
            hit = (params, h.digest())
            self._cache["fp1"] = hit
        return hit[1]

    def _expected_fingerprint(self, params: Params, data: bytes) -> bytes:
        """This model's fingerprint, or its first-scheme one for a file that carries that."""
        fp = self.fingerprint(params)
        try:
            carried = ct.unpack(data).fingerprint
        except BitstreamError:
            return fp  # decoding reports it
        return carried if carried != fp and carried == self._first_fingerprint(params) else fp

    def _jit(self, name: str, fn: Callable, static: tuple[str, ...] = ()) -> Callable:
        if name not in self._cache:
            self._cache[name] = jax.jit(fn, static_argnames=static)
        return self._cache[name]

    def compress(self, params: Params, image: np.ndarray, steps: int | None = None,
                 t_start: int | None = None, eta: float | None = None,
                 seed: int | None = None) -> bytes:
        """uint8 image (HxW, HxWx1/3/4, any size) -> container bytes with the sampler spec;
        alpha is composited over white, as the CLI reads RGBA files (:func:`H.to_rgb`)."""
        (data,) = self.compress_batch(params, [image], steps, t_start, eta, seed)
        if isinstance(data, Exception):
            raise data
        return data

    def compress_batch(self, params: Params, images: Sequence[np.ndarray],
                       steps: int | None = None, t_start: int | None = None,
                       eta: float | None = None, seed: int | None = None
                       ) -> list[bytes | Exception]:
        """:meth:`compress` of several images, those of one padded size through the VAE
        encoder and the compressor's analysis in one device call; an image that cannot be
        coded gets its error in its place. A file may differ from the one written alone
        where float rounding differs between batch sizes; it decodes all the same.
        ``images``: a sequence of images or an NHWC array; one image (a 2-D or 3-D array) is
        a TypeError (:func:`H.check_image_batch`)."""
        H.check_image_batch(images)
        spec = self.sampler_spec(steps, t_start, eta, seed)
        prep, fp, _ = self._prepared(params)

        def analyse(params, x):
            z0 = self.encode_z0(params, x)
            return self.compressor.apply({"params": params["compressor"]}, x, z0,
                                         method=HFCompressor.encode_latents_device)

        jitted = self._jit("analyse", analyse)
        analysed = H.analyse_images(images, lambda x: jitted(params, x), self.multiple,
                                    to_model_input)
        return H.files_of(prep.coder, analysed, CODEC_ID, fp, spec)

    def sampler_spec(self, steps: int | None = None, t_start: int | None = None,
                     eta: float | None = None, seed: int | None = None) -> ct.SamplerSpec:
        """The spec :meth:`compress` writes: the config's ``sampler`` with these overrides."""
        sc = self.cfg["sampler"]
        given = {"steps": steps, "t_start": t_start, "eta": eta, "seed": seed}
        value = {k: sc[k] if v is None else v for k, v in given.items()}
        for k, v in value.items():  # int() took steps=1.7 as 1 and steps="3" as 3, silently
            whole = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
            number = whole or isinstance(v, (float, np.floating))
            if not (number if k == "eta" else whole):
                raise ValueError(f"sampler {k} must be {'a number' if k == 'eta' else 'an integer'}"
                                 f", got {v!r}")
        spec = ct.SamplerSpec(int(value["steps"]), int(value["t_start"]), float(value["eta"]),
                              int(value["seed"]))
        self._check_spec(spec)
        return spec

    def _check_spec(self, spec: ct.SamplerSpec) -> None:
        """A spec this model's schedule can sample (else compress wrote files that failed
        inside the decoder's trace: a t_start below every "trailing" timestep, more steps
        than a schedule of fewer than 1000 training timesteps has, or SD's leading spacing
        with steps_offset 1 at 1000 steps, whose first timestep, 1000, is past the schedule:
        diffusers raises an IndexError there, the UNet ran at t=1000)."""
        t_max = self.schedule.num_train_timesteps
        if not 1 <= spec.steps <= t_max or not 0 <= spec.t_start < t_max:
            raise ValueError(f"sampler spec out of range: {spec} "
                             f"(steps 1..{t_max}, t_start 0..{t_max - 1})")
        if not (np.isfinite(spec.eta) and 0 <= spec.eta <= 1):
            raise ValueError(f"sampler eta must be in [0, 1], got {spec.eta}")
        if not 0 <= spec.seed < ct.SEED_LIMIT:  # else every file's packing fails
            raise ValueError(f"sampler seed must be in 0..2**64-1, got {spec.seed}")
        try:
            ts = schedules.ddim_timesteps(self.schedule, spec.steps, spec.t_start or None)
        except ValueError as e:
            raise ValueError(f"sampler spec {spec}: {e}") from None
        if int(ts.max()) >= t_max:
            raise ValueError(f"sampler spec {spec}: its first DDIM timestep, {int(ts.max())}, "
                             f"is past the schedule's last, {t_max - 1} (fewer steps)")

    def decompress(self, params: Params, data: bytes, max_pixels: int | None = H.MAX_PIXELS
                   ) -> np.ndarray:
        """Container bytes -> uint8 image of the original size and channel count (an RGBA
        image decoded opaque, as its composite over white); ``max_pixels`` None: no limit."""
        return self._reconstruct(params, [self._decoded(params, data, max_pixels)])[0]

    def decompress_batch(self, params: Params, datas: Sequence[bytes],
                         max_pixels: int | None = H.MAX_PIXELS) -> list[np.ndarray | Exception]:
        """:meth:`decompress` of several files, those of one latent size and sampler (steps,
        t_start, eta zero or not) in one sampler run: the device works on a batch instead of
        one image at a time. Each file draws its noise from its own seed, so it decodes as it would
        alone. A file that cannot be decoded gets its error in its place; the others go on.
        A sampler run takes at most :data:`H.BATCH_PIXELS` padded pixels (any one file
        alone), as compressing does: 100 files of one size ran as one batch of 128.
        One bytes object for ``datas`` is a TypeError (iterated, it was one error per byte)."""
        if isinstance(datas, (bytes, bytearray, memoryview, str)):
            raise TypeError(f"datas must be a sequence of bytes objects; got one "
                            f"{type(datas).__name__} object: use decompress()")
        H.check_max_pixels(max_pixels)  # once, not one error per file
        self._prepared(params)  # params that do not fit: one error, not one per file
        out: list[Any] = [None] * len(datas)
        decoded: dict[int, tuple[ct.Container, np.ndarray]] = {}
        groups: dict[tuple, list[int]] = {}
        for i, data in enumerate(datas):
            try:
                decoded[i] = self._decoded(params, data, max_pixels)
            except (FasdiffError, ValueError) as e:  # BitstreamError and what decompress raises
                out[i] = e
                continue
            c, y_hat = decoded[i]
            key = (y_hat.shape, c.sampler.steps, c.sampler.t_start, c.sampler.eta > 0)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            c = decoded[members[0]][0]  # at most H.BATCH_PIXELS (padded) per sampler run
            pixels = (c.height + c.pad_bottom) * (c.width + c.pad_right)
            per_run = 1 << max(0, (H.BATCH_PIXELS // pixels).bit_length() - 1)
            for start in range(0, len(members), per_run):
                chunk = members[start:start + per_run]
                try:
                    images = self._reconstruct(params, [decoded[i] for i in chunk])
                except (FasdiffError, ValueError) as e:  # in its files' places
                    images = [e] * len(chunk)
                for i, image in zip(chunk, images):
                    out[i] = image
        return out

    def _decoded(self, params: Params, data: bytes, max_pixels: int | None
                 ) -> tuple[ct.Container, np.ndarray]:
        """A file's container and latents: the host's part of decoding (header, fingerprint,
        entropy decoding with the integer h_s)."""
        wrapped = self._prepared(params)[2]
        c, y_hat = H.decode_file_latents(self.compressor, wrapped, data, max_pixels,
                                         codec_id=CODEC_ID,
                                         fingerprint=self._expected_fingerprint(params, data))
        try:
            self._check_spec(c.sampler)
        except ValueError as e:
            raise BitstreamError(str(e)) from e
        return c, y_hat

    def _reconstruct(self, params: Params, decoded: list[tuple[ct.Container, np.ndarray]]
                     ) -> list[np.ndarray]:
        """The device's part for files of one latent shape and sampler (steps, t_start, eta
        zero or not): one vmapped sampler run, the batch padded to a power of two (one
        compiled program per size 1, 2, 4, ...). Each file's eta is an operand (a static eta
        compiled a program per value: ~6 s each for the tiny model here). The noise comes
        from threefry keys, partitionable, whatever the process's JAX defaults (another
        ``jax_default_prng_impl`` or ``jax_threefry_partitionable`` decoded other pixels)."""

        def reconstruct(params, y_hat, seed_lo, seed_hi, etas, steps, t_start, stochastic):
            def one(y, lo, hi, eta):
                prompt, z_coarse = self.compressor.apply({"params": params["compressor"]},
                                                         y[None], method=HFCompressor.synthesis)
                rng = jax.random.fold_in(jax.random.key(lo, impl="threefry2x32"), hi)
                z = self.sample(params, prompt, z_coarse, rng, steps, t_start,
                                eta if stochastic else 0.0)
                return (self.decode_latent(params, z)[0] + 1.0) / 2.0

            return jax.vmap(one)(y_hat, seed_lo, seed_hi, etas)

        n = len(decoded)
        padded = H.pow2_padded(decoded)
        seeds = [c.sampler.seed for c, _ in padded]
        s = decoded[0][0].sampler
        with jax.threefry_partitionable(True):
            out = self._jit("reconstruct", reconstruct, ("steps", "t_start", "stochastic"))(
                params, jnp.asarray(np.stack([y for _, y in padded]), jnp.float32),
                np.asarray([x & 0xFFFFFFFF for x in seeds], np.uint32),
                np.asarray([x >> 32 for x in seeds], np.uint32),
                np.asarray([c.sampler.eta for c, _ in padded], np.float32),
                steps=s.steps, t_start=s.t_start, stochastic=s.eta > 0)
        out = np.asarray(out[:n])
        return [H.to_uint8(image, c) for image, (c, _) in zip(out, decoded)]


# What a file's fingerprint covers besides the compressor (the loss networks are not part
# of coding). Scheme 2 (2026-11-27) hashes each array on its own, in parallel: 0.42 s vs
# 0.90 s for the reduced SD-2.1 model's 0.85 GB on this project's 2-core CPU, so ~2.6 vs
# ~5.5 s estimated for SD-2.1 with a full ControlNet at every codec start, and it scales
# with cores where scheme 1's one blake2b stream (FaSDiff._first_fingerprint, still
# accepted) does not.
FINGERPRINTED = ("hlfe", "controlnet", "unet", "vae", "null_text")
FINGERPRINT_SCHEME = b"fasdiff-fingerprint-2"


def _array_digests(arrays: list[Any]) -> list[bytes]:
    """sha256 of each array's little-endian float32 bytes, on a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    def one(a: Any) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(np.asarray(a, "<f4"))).digest()

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, arrays))


def _load_sd_checkpoint(model: FaSDiff, ckpt: str) -> tuple[Params, Params, jax.Array]:
    """unet, vae and null-text from a folder written by ``python -m fasdiff_jax.convert``."""
    if not os.path.isdir(ckpt):
        raise ConversionError(f"sd_checkpoint {ckpt!r} is not a folder (convert a diffusers SD "
                              f"pipeline with python -m fasdiff_jax.convert)")
    unet_mod, unet_params = convert.load_component(os.path.join(ckpt, "unet"))
    vae_mod, vae_params = convert.load_component(os.path.join(ckpt, "vae"))
    for ours, theirs, what in ((model.unet, unet_mod, "unet"), (model.vae, vae_mod, "vae")):
        fields = [f for f in type(ours).__dataclass_fields__
                  if f not in ("parent", "name", "dtype", "remat", "attention_impl")]
        diff = [f for f in fields if getattr(ours, f) != getattr(theirs, f)]
        if diff:
            raise ConversionError(f"{ckpt}/{what} does not match config.model.{what}: fields "
                                  f"{diff} differ (build the model from the checkpoint's config)")
    null = convert.load_null_text_embedding(ckpt)
    diff = model.null_text_differences(null)  # a text encoder of another width: it failed
    if diff:  # in the first training step, with flax's ScopeParamShapeError
        raise ConversionError(f"{os.path.join(ckpt, convert.NULL_TEXT_FILE)} does not fit "
                              f"{ckpt}/unet: {listed(diff)} (the text encoder converted with "
                              f"it is not this UNet's: convert the pipeline again)")
    return unet_params, vae_params, null


def _scheduler_file(ckpt: str) -> str:
    return os.path.join(ckpt, "scheduler", "scheduler_config.json")


def schedule_settings(cfg: Any) -> dict:
    """The noise schedule's settings of ``config.model``: the SD folder's scheduler config
    (checked and named by path where damaged) under ``config.model.scheduler``'s own; ``{}``
    (:meth:`schedules.Schedule.create`'s defaults) where neither says."""
    cfg = _as_dict(cfg)
    own = _as_dict(cfg.get("scheduler"))
    ckpt = cfg.get("sd_checkpoint") or ""
    if ckpt and os.path.lexists(_scheduler_file(ckpt)):
        return {**convert.read_scheduler_config(_scheduler_file(ckpt)), **own}
    return own


def schedule_arguments(settings: Mapping[str, Any]) -> dict:
    """The arguments of ``settings`` that :meth:`schedules.Schedule.create` takes and that
    differ from its defaults, numbers as floats: two spellings of one schedule (a default
    written out, ``1`` for ``1.0``, keys it does not take) give equal arguments, and a
    parameter added to ``create`` later leaves them as they are (what a run's fingerprint
    names)."""
    def canonical(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [canonical(x) for x in v]
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    params = inspect.signature(schedules.Schedule.create).parameters
    return {k: canonical(settings[k]) for k, p in params.items()
            if k in settings and canonical(settings[k]) != canonical(p.default)}


def build(cfg: Any, new_run: bool = True) -> FaSDiff:
    """A :class:`FaSDiff` from ``config.model`` (a ConfigDict or mapping). An SD folder
    without its scheduler config (convert wrote such folders before it required one) is
    refused for a ``new_run``; a model trained on one (resumed, or restored to code) keeps
    the default schedule it was trained with, with a warning."""
    cfg = _as_dict(cfg)
    dtype = jnp.dtype(cfg.get("compute_dtype", "float32"))
    common = dict(dtype=dtype, remat=bool(cfg.get("remat", False)),
                  attention_impl=cfg.get("attention_impl", "xla"))
    ckpt = cfg.get("sd_checkpoint") or ""
    unet_cfg, vae_cfg = (_as_dict(cfg.get(k)) for k in ("unet", "vae"))
    sched_cfg = schedule_settings(cfg)
    if ckpt:
        unet_cfg = convert.read_config(os.path.join(ckpt, "unet"))
        vae_cfg = convert.read_config(os.path.join(ckpt, "vae"))
        unknown = not sched_cfg and not os.path.lexists(_scheduler_file(ckpt))
        if unknown and new_run:  # Schedule.create's defaults are not SD's
            raise ConversionError(
                f"sd_checkpoint {ckpt}: no scheduler/scheduler_config.json and "
                f"config.model.scheduler is empty: the noise schedule is unknown (converted "
                f"without the pipeline's scheduler/): convert the pipeline again with "
                f"python -m fasdiff_jax.convert")
        elif unknown:
            logging.warning("sd_checkpoint %s has no scheduler/scheduler_config.json: this "
                            "model keeps the default linear schedule it was trained with, "
                            "not SD's (convert the pipeline again for new runs)", ckpt)
        cfg = {**cfg, "unet": unet_cfg, "vae": vae_cfg, "scheduler": sched_cfg}
    unet = UNet2DConditionModel.from_diffusers_config(unet_cfg, **common)
    vae = AutoencoderKL.from_diffusers_config(vae_cfg, **common)
    cc = _as_dict(cfg["compressor"])
    vae_levels = len(vae.block_out_channels) - 1
    compressor = HFCompressor(N=cc["N"], M=cc["M"], num_scales=cc["num_scales"],
                              prompt_channels=cc["prompt_channels"],
                              latent_channels=vae.latent_channels, vae_levels=vae_levels,
                              dwt_levels=cc["dwt_levels"], groups=cc["groups"])
    hc = _as_dict(cfg["hlfe"])
    down, mid = unet_skip_targets(unet)
    hlfe = HybridLowFrequencyEnhancement(down, mid, features=hc["features"],
                                         num_blocks=hc["num_blocks"], heads=hc["heads"],
                                         groups=hc["groups"], dwt_levels=hc["dwt_levels"])
    sched = schedules.Schedule.create(**{k: v for k, v in sched_cfg.items()
                                         if k in inspect.signature(
                                             schedules.Schedule.create).parameters})
    lc = _as_dict(cfg["loss"])
    cfg = {**cfg, "loss": lc, "control": _as_dict(cfg["control"]),
           "sampler": _as_dict(cfg["sampler"])}
    cache: dict = {}
    identity = lpips = None
    if lc.get("identity", 0) > 0:  # dlib's file gives both the module (its mean) and params
        identity, cache["identity_params"] = identity_lib.load_dlib_identity(
            cfg.get("identity_path") or None)
    if lc.get("lpips", 0) > 0:
        lpips, cache["lpips_params"] = perceptual.load_lpips(cfg.get("lpips_net", "alexnet"))
    control = controlnet_lib.ControlNetModel(
        **{f: getattr(unet, f) for f in controlnet_lib.unet_lib.ENCODER_FIELDS},
        conditioning_channels=compressor.prompt_channels, conditioning_downsample=False,
        conditioning_embedding_out_channels=tuple(cfg["control"]["embedding_channels"]))
    return FaSDiff(cfg=cfg, unet=unet, vae=vae, controlnet=control, compressor=compressor,
                   hlfe=hlfe, schedule=sched, identity=identity, lpips=lpips, _cache=cache)
