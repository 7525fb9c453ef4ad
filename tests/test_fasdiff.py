"""The FaSDiff model on the tiny config: training, the frozen split, NaN reporting, the codec."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from skimage import data as skdata

from configs import tiny
from data_fixtures import embedded_dirs  # noqa: F401 (fixture)
from fasdiff_jax import convert, sharding
from fasdiff_jax.coding import BitstreamError
from fasdiff_jax.coding import container as ct
from fasdiff_jax.data.pipeline import make_train_iterator
from fasdiff_jax.diffusion import schedules
from fasdiff_jax.errors import ConversionError, NonFiniteLossError
from fasdiff_jax.models import fasdiff
from fasdiff_jax.models import hyperprior as H

ROOT = Path(__file__).resolve().parents[1]
STEPS, X0_EVERY = 200, 50


@pytest.fixture(scope="module")
def tiny_model():
    model = fasdiff.build(tiny.get_config().model)
    return model, model.init_params(jax.random.key(0))


def _np_tree(tree):
    return {k: np.array(v) for k, v in flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def training(tiny_model, embedded_dirs, tmp_path_factory):  # noqa: F811
    """~200 steps on the embedded faces; x̂0 terms (identity, LPIPS) every 50 steps."""
    model, params0 = tiny_model
    cfg = tiny.get_config()
    cfg.data.source = f"prepared:{embedded_dirs['train']}"
    mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    it = make_train_iterator(cfg.data, mesh)
    opt = optax.adam(cfg.train.learning_rate)
    before = _np_tree(params0)
    params = jax.device_put(jax.tree.map(jnp.array, params0), NamedSharding(mesh, P()))
    opt_state = jax.device_put(model.init_opt_state(opt, params), NamedSharding(mesh, P()))
    plain = model.make_train_step(opt, False, mesh=mesh)
    with_x0 = model.make_train_step(opt, True, mesh=mesh)
    history, snapshots = [], {}
    for i in range(STEPS):
        step = with_x0 if i % X0_EVERY == 0 else plain
        batch = next(it)
        params, opt_state, metrics = step(params, opt_state, batch,
                                          jax.random.fold_in(jax.random.key(1), i))
        metrics = {k: float(v) for k, v in metrics.items()}
        fasdiff.check_finite(metrics, i)
        history.append(metrics)
        if i in (0, 1, 2):
            snapshots[i] = _np_tree(params)
    return model, before, snapshots, history, params, (plain, batch, with_x0, opt_state)


@pytest.mark.xdist_group("fasdiff_training")  # one worker trains
def test_training_terms_fall_without_nan(training):
    *_, history, _, _ = training
    for term in ("bpp", "diffusion", "latent", "high_freq", "loss"):
        first = np.mean([h[term] for h in history[:20]])
        last = np.mean([h[term] for h in history[-20:]])
        assert last < 0.8 * first, f"{term}: {first:.4f} -> {last:.4f}"
    x0_steps = [h for h in history if "identity" in h]
    assert len(x0_steps) == STEPS // X0_EVERY
    for h in x0_steps:  # computed, finite, in range (their fall on fresh batches: see README)
        assert 0 <= h["identity"] <= 2 and 0 <= h["lpips"] < 2


STAGE2_STEPS = 60  # identity, LPIPS, loss at 0.77, 0.85, 0.73 of step 0 (100 steps: 0.79, 0.78, 0.64)


@pytest.mark.xdist_group("fasdiff_training")  # one worker trains
def test_stage2_identity_and_lpips_fall_on_a_fixed_batch(training):
    """Stage 2 (x̂0 terms every step) fitted to one batch and one (t, noise) draw: identity
    and LPIPS on x̂0 must fall, so their gradients reach the compressor, control and HLFE
    through the frozen UNet, VAE decoder, dlib net and LPIPS. On fresh batches they do not
    fall measurably with *random* frozen SD weights in a few hundred steps (README)."""
    model, *_, params, (_, batch, with_x0, opt_state) = training
    params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))  # the fixture's stay live
    rng = jax.random.key(2024)
    history = []
    for i in range(STAGE2_STEPS):
        params, opt_state, metrics = with_x0(params, opt_state, batch, rng)
        history.append({k: float(v) for k, v in metrics.items()})
        fasdiff.check_finite(history[-1], i)
    first, last = history[0], history[-1]
    for term, factor in (("identity", 0.95), ("lpips", 0.9), ("loss", 0.8)):
        assert last[term] < factor * first[term], f"{term}: {first[term]:.4f} -> {last[term]:.4f}"


# Zero-initialised layers block the gradient to what precedes them until they have moved:
# on the first step the ControlNet's zero convs, HLFE's modulation heads and the compressor
# (through the prompt) get gradients, but nothing inside the ControlNet or HLFE; on the
# second step everything but the ControlNet's conditioning embedding (behind its own zero
# ``conv_out``); from the third step on, every trainable leaf.
def _blocked(key: tuple[str, ...], step: int) -> bool:
    if step == 0:
        if key[:2] == ("compressor", "prompt_head"):
            return True
        if key[0] == "controlnet":
            return not key[1].startswith(("controlnet_down_blocks_", "controlnet_mid_block"))
        if key[0] == "hlfe":
            return not re.fullmatch(r"mod_down_\d+|mod_mid", key[1])
    if step == 1:
        return key[:2] == ("controlnet", "controlnet_cond_embedding") and key[2] != "conv_out"
    return False


@pytest.mark.xdist_group("fasdiff_training")  # one worker trains
def test_frozen_bit_identical_and_every_trainable_leaf_moves(training):
    model, before, snapshots, *_ = training
    mask = flatten_dict(model.trainable_mask(jax.tree.map(np.asarray, _unflat(before))))
    for step in (0, 1, 2):
        after = snapshots[step]
        for k, trainable in mask.items():
            same = np.array_equal(before[k], after[k])
            if not trainable:
                assert same, f"frozen {'/'.join(k)} changed at step {step}"
            elif _blocked(k, step):
                assert same, f"{'/'.join(k)} moved by step {step} although zero-init blocks it"
            else:
                assert not same, f"trainable {'/'.join(k)} got no gradient by step {step}"
    assert {k[0] for k, t in mask.items() if not t} == {"unet", "vae", "null_text", "identity",
                                                        "lpips"}


def _unflat(flat):
    from flax.traverse_util import unflatten_dict

    return unflatten_dict(flat)


@pytest.mark.xdist_group("fasdiff_training")  # one worker trains
def test_nan_is_reported_naming_the_term(training):
    model, *_, params, (plain, batch, *_) = training
    bad = jax.tree.map(jnp.array, params)
    bad["compressor"]["latent_head"]["bias"] = bad["compressor"]["latent_head"]["bias"] * jnp.nan
    # the step function, shapes and shardings of training: no recompilation
    opt_state = jax.device_put(model.init_opt_state(optax.adam(1e-3), bad),
                               jax.tree.leaves(params)[0].sharding)
    _, _, metrics = plain(bad, opt_state, batch, jax.random.key(0))
    with pytest.raises(NonFiniteLossError, match="latent=nan") as e:
        fasdiff.check_finite({k: float(v) for k, v in metrics.items()}, 7)
    assert "at step 7" in str(e.value) and "latent" in e.value.terms and "bpp" not in e.value.terms


# ---------------------------------------------------------------------------------- codec
def _photo_variants():
    face = skdata.astronaut()[20:220, 140:340]  # a real face, 200x200
    small = np.asarray(jax.image.resize(face.astype(np.float32), (61, 50, 3), "linear"))
    rgb = np.clip(np.round(small), 0, 255).astype(np.uint8)
    gray = np.round(rgb.mean(-1)).astype(np.uint8)
    rgba = np.concatenate([rgb[:40, :33], np.full((40, 33, 1), 200, np.uint8)], -1)
    return {"rgb": rgb, "gray": gray, "rgba": rgba}


_DECODE = r"""
import sys, hashlib, json, numpy as np, jax
jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
from configs import tiny
from fasdiff_jax.models import fasdiff
from flax.traverse_util import unflatten_dict
model = fasdiff.build(tiny.get_config().model)
flat = np.load(sys.argv[2])
params = unflatten_dict({tuple(k.split("/")): jax.numpy.asarray(flat[k]) for k in flat.files})
img = model.decompress(params, open(sys.argv[3], "rb").read())
print(json.dumps({"n": len(jax.devices()), "shape": img.shape,
                  "sha": hashlib.sha256(img.tobytes()).hexdigest()}))
"""


def test_round_trip_any_size_and_mode_and_cross_process(tiny_model, tmp_path):
    model, params = tiny_model
    decoded = {}
    for name, img in _photo_variants().items():
        data = model.compress(params, img, seed=42)
        out = model.decompress(params, data)
        assert out.shape == (img.shape if img.ndim == 3 else img.shape + (1,)), name
        assert out.dtype == np.uint8
        decoded[name] = (data, out)
    data, out = decoded["rgb"]
    assert len(data) < 400  # a 61x50 face in a few hundred bytes (header 70 + payload)
    assert np.array_equal(model.decompress(params, data), out)  # deterministic in-process
    other_seed = model.decompress(params, model.compress(params, _photo_variants()["rgb"], seed=7))
    assert not np.array_equal(other_seed, out)  # the stored seed drives the sampler

    import hashlib

    np.savez(tmp_path / "params.npz", **{"/".join(k): np.asarray(v)
                                         for k, v in flatten_dict(params).items()})
    (tmp_path / "face.fsd").write_bytes(data)
    want = hashlib.sha256(out.tobytes()).hexdigest()
    for devices in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu")
        res = subprocess.run([sys.executable, "-c", _DECODE, str(ROOT), str(tmp_path / "params.npz"),
                              str(tmp_path / "face.fsd")], capture_output=True, text=True,
                             env=env, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads(res.stdout.strip().splitlines()[-1])
        assert got["n"] == devices and got["sha"] == want


def test_compress_batch_runs_images_of_one_size_together(tiny_model, monkeypatch):
    """The VAE encoder and the compressor's analysis see images of one padded size in one
    call; a bad image gets its error in its place; the files carry the sampler spec and hold
    the symbols of the files written alone (float rounding may differ between batch sizes:
    allowed in 0.1% of symbols)."""
    model, params = tiny_model
    v = _photo_variants()
    images = [v["rgb"], v["gray"], np.zeros((9, 9, 3), np.float32), v["rgba"], v["rgb"][:, ::-1]]
    shapes = []
    analyse_images = H.analyse_images

    def recording(images, analyse, *args):
        return analyse_images(images, lambda x: shapes.append(x.shape) or analyse(x), *args)

    monkeypatch.setattr(H, "analyse_images", recording)
    results = model.compress_batch(params, images, steps=2, seed=9)
    assert shapes == [(4, model.multiple, model.multiple, 3)]  # all pad to one size
    assert isinstance(results[2], TypeError)
    for img, data in zip(images, results):
        if isinstance(data, Exception):
            continue
        c = ct.unpack(data)
        assert (c.height, c.width) == img.shape[:2] and c.sampler.steps == 2 and c.sampler.seed == 9
        alone = model.compress(params, img, steps=2, seed=9)
        y_batched = model._decoded(params, data, H.MAX_PIXELS)[1]
        y_alone = model._decoded(params, alone, H.MAX_PIXELS)[1]
        assert np.mean(y_batched != y_alone) <= 1e-3
    assert model.decompress(params, results[0]).shape == v["rgb"].shape


def test_files_are_the_same_with_the_integer_hs_on_the_device(tiny_model, monkeypatch):
    """FASDIFF_HS_PLACE=device (the GPU default) writes the same file and decodes it to the
    same pixels as the host h_s; the codec picks the place up after a change."""
    model, params = tiny_model
    img = _photo_variants()["rgb"]
    monkeypatch.setenv(H.HS_PLACE_ENV, "host")
    data = model.compress(params, img, seed=3, steps=2)
    out = model.decompress(params, data)
    monkeypatch.setenv(H.HS_PLACE_ENV, "device")
    assert model._prepared(params)[0].coder.hs_device is not None
    assert model.compress(params, img, seed=3, steps=2) == data
    assert np.array_equal(model.decompress(params, data), out)


def test_inference_rebuilds_the_frozen_parts_without_the_trainable_ones(tiny_model):
    """``frozen_params`` (what ``restore_for_inference`` uses) gives ``init_params``' frozen
    parts bit for bit, and ``trainable_shapes`` their trainable shapes and dtypes, so a
    checkpoint is checked and the frozen SD weights (and thus file fingerprints) match
    training's, without drawing a ControlNet or compiling the initialisers."""
    model, params = tiny_model
    trainable, frozen = fasdiff.FaSDiff.split(params)
    again = model.frozen_params(jax.random.key(0))
    assert set(again) == set(frozen)
    for k, v in flatten_dict(frozen).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(again)[k]), np.asarray(v))
    shapes = flatten_dict(model.trainable_shapes())
    assert {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in shapes.items()} == {
        k: (np.shape(v), np.asarray(v).dtype) for k, v in flatten_dict(trainable).items()}
    other = model.frozen_params(jax.random.key(1))  # another seed: other random SD weights
    assert not np.array_equal(np.asarray(flatten_dict(other)[("unet", "conv_in", "kernel")]),
                              np.asarray(flatten_dict(frozen)[("unet", "conv_in", "kernel")]))


def test_codec_rejects_bad_files(tiny_model):
    model, params = tiny_model
    data = model.compress(params, _photo_variants()["rgb"])
    for bad in (data[:-5], data[:20], b"junk" + data[4:], bytes(len(data))):
        with pytest.raises(BitstreamError):
            model.decompress(params, bad)
    other = jax.tree.map(lambda a: a, params)
    other["hlfe"] = jax.tree.map(lambda a: a + 1.0, params["hlfe"])
    with pytest.raises(BitstreamError, match="fingerprint"):
        model.decompress(other, data)
    with pytest.raises(ValueError, match="sampler"):
        model.compress(params, _photo_variants()["rgb"], steps=0)


def test_params_of_another_config_are_refused_by_name(tiny_model):
    """A part missing or a weight of another shape failed inside flax after the device work
    began (decompress_batch: once per file); now one ConversionError naming it."""
    from flax.traverse_util import unflatten_dict

    model, params = tiny_model
    img = _photo_variants()["rgb"]
    data = model.compress(params, img)
    no_vae = {k: v for k, v in params.items() if k != "vae"}
    with pytest.raises(ConversionError, match=re.escape(
            "params lack vae (FaSDiff codes with compressor, hlfe, controlnet, unet, vae, "
            "null_text)")):
        model.compress(no_vae, img)
    flat = flatten_dict(params["controlnet"])
    name = sorted(flat)[0]
    before = flat[name].shape
    flat[name] = flat[name][..., :-1]
    wrong = {**params, "controlnet": unflatten_dict(flat)}
    message = (f"params do not fit this FaSDiff config: controlnet/{'/'.join(name)}: "
               f"{flat[name].shape} != {before}")
    for call in (lambda: model.compress(wrong, img), lambda: model.decompress(wrong, data),
                 lambda: model.decompress_batch(wrong, [data, data])):
        with pytest.raises(ConversionError, match=re.escape(message) + "$"):
            call()
    with pytest.raises(ConversionError, match="expected the dict init_params returns, got list"):
        model.decompress([], data)


def test_frozen_sd_parts_of_other_shapes_are_refused_by_name(tiny_model):
    """A VAE or UNet of other shapes failed inside flax (compress: ScopeParamShapeError) or
    as a fingerprint mismatch (decompress); the outer convolutions' shapes, computed from the
    config without tracing, now give one ConversionError naming the leaves."""
    model, params = tiny_model
    want = fasdiff.frozen_probe_shapes(model.unet, model.vae)
    flat = flatten_dict(params, sep="/")
    assert {k: np.shape(flat[k]) for k in want} == want  # the rule matches the real modules
    img = _photo_variants()["rgb"]
    # a well-formed file carrying this model's fingerprint: no device work needed
    data = ct.pack(ct.Container(61, 50, 3, 14, 3, fasdiff.CODEC_ID, model.fingerprint(params),
                                (b"\x01",), ct.SamplerSpec(2, 0, 0.0, 1)))
    narrow = {**params, "vae": jax.tree.map(lambda x: x[..., :1], params["vae"])}
    message = "params do not fit this FaSDiff config: .*vae/encoder/conv_in/kernel: " + re.escape(
        f"(3, 3, 3, 1) != {want['vae/encoder/conv_in/kernel']}")
    for call in (lambda: model.compress(narrow, img), lambda: model.decompress(narrow, data),
                 lambda: model.decompress_batch(narrow, [data])):
        with pytest.raises(ConversionError, match=message):
            call()
    unet = {**params, "unet": jax.tree.map(lambda x: x[..., :1], params["unet"])}
    with pytest.raises(ConversionError, match="unet/conv_out/kernel: "):
        model.decompress(unet, data)
    no_quant = {**params, "vae": {k: v for k, v in params["vae"].items() if k != "quant_conv"}}
    with pytest.raises(ConversionError, match="config: missing vae/quant_conv/kernel$"):
        model.compress(no_quant, img)
    other_text = {**params, "null_text": params["null_text"][..., :3]}  # another text encoder
    with pytest.raises(ConversionError, match=re.escape(
            f"null_text: (1, {params['null_text'].shape[1]}, 3) != (1, L, "
            f"{model.unet.cross_attention_dim})")):
        model.decompress(other_text, data)
    with pytest.raises(ConversionError, match="params lack null_text"):
        model.compress({k: v for k, v in params.items() if k != "null_text"}, img)


def test_one_image_or_file_where_a_batch_is_expected_is_refused(tiny_model):
    """compress_batch(params, img) coded each pixel row as an image; decompress_batch(params,
    data) gave one BitstreamError per byte; compress(params, [img]) an AttributeError."""
    model, params = tiny_model
    img = _photo_variants()["rgb"]
    with pytest.raises(TypeError, match="got one HxWxC image .*use compress.*N x H x W x 1"):
        model.compress_batch(params, img)
    for data in (bytes(80), bytearray(80), memoryview(bytes(80))):
        with pytest.raises(TypeError, match="sequence of bytes objects; got one "
                                            f"{type(data).__name__} object: use decompress"):
            model.decompress_batch(params, data)
    with pytest.raises(TypeError, match="expected one image .* got a list"):
        model.compress(params, [img])
    with pytest.raises(TypeError, match="max_pixels must be an int"):
        model.decompress_batch(params, [bytes(80)], max_pixels="1000")


def test_fingerprint_covers_frozen_weights_and_files_of_the_first_scheme_decode(tiny_model):
    """Files carry fingerprint scheme 2 (per-array sha256 in parallel); one frozen weight
    changed changes it; a file written with scheme 1 (before 2026-11-27, forged here by
    swapping the header's fingerprint) still decodes, to the same pixels."""
    model, params = tiny_model
    img = _photo_variants()["rgb"]
    data = model.compress(params, img, seed=5, steps=2)
    c = ct.unpack(data)
    assert c.fingerprint == model.fingerprint(params) != model._first_fingerprint(params)
    old_file = ct.pack(dataclasses.replace(c, fingerprint=model._first_fingerprint(params)))
    assert np.array_equal(model.decompress(params, old_file), model.decompress(params, data))
    other = jax.tree.map(lambda a: a, params)
    kernel = np.array(other["unet"]["conv_in"]["kernel"])
    kernel.flat[7] = np.nextafter(kernel.flat[7], np.float32(np.inf))  # one ulp
    other["unet"]["conv_in"]["kernel"] = jnp.asarray(kernel)
    assert model.fingerprint(other) != model.fingerprint(params)
    for file in (data, old_file):
        with pytest.raises(BitstreamError, match="fingerprint"):
            model.decompress(other, file)
    # the same params object with an array replaced inside it: its fingerprint follows (the
    # cache per params object kept the old one, so files named weights they were not coded
    # with); and back again
    mutated = jax.tree.map(lambda a: a, params)
    assert model.fingerprint(mutated) == model.fingerprint(params)
    original = mutated["unet"]["conv_in"]["kernel"]
    mutated["unet"]["conv_in"]["kernel"] = other["unet"]["conv_in"]["kernel"]
    assert model.fingerprint(mutated) == model.fingerprint(other)
    mutated["unet"]["conv_in"]["kernel"] = original
    assert model.fingerprint(mutated) == model.fingerprint(params)


def test_missing_or_mismatched_sd_checkpoint(tmp_path):
    cfg = tiny.get_config().model
    cfg.sd_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="config.json"):
        fasdiff.build(cfg)
    ckpt = tmp_path / "ckpt"
    base = fasdiff.build(tiny.get_config().model)
    for name, mod in (("unet", base.unet), ("vae", base.vae)):
        convert.save_component(str(ckpt / name), dict(tiny.get_config().model[name]),
                               convert.random_params(mod, 0))
    cfg.sd_checkpoint = str(ckpt)
    model = fasdiff.build(cfg)
    with pytest.raises(ConversionError, match="null_text"):
        model.init_params(jax.random.key(0))
    # a checkpoint whose params do not fit its config.json
    cfg_json = json.loads((ckpt / "unet" / "config.json").read_text())
    cfg_json["block_out_channels"] = [16, 48]
    (ckpt / "unet" / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ConversionError, match="does not match"):
        fasdiff.build(cfg).init_params(jax.random.key(0))


def test_sampler_overrides_of_the_wrong_type_are_refused(tiny_model):
    """``int()`` took steps=1.7 as 1, steps=True as 1 and steps="3" as 3, silently."""
    model, _ = tiny_model
    for kw, what in ((dict(steps=1.7), "steps must be an integer"),
                     (dict(steps=True), "steps must be an integer"),
                     (dict(steps="3"), "steps must be an integer"),
                     (dict(seed=1.5), "seed must be an integer"),
                     (dict(eta="0.5"), "eta must be a number")):
        with pytest.raises(ValueError, match=what):
            model.sampler_spec(**kw)
    spec = model.sampler_spec(steps=np.int64(3), eta=1, seed=np.uint32(7), t_start=0)
    assert (spec.steps, spec.eta, spec.seed) == (3, 1.0, 7)


def test_sampler_specs_the_schedule_cannot_sample_are_refused(tiny_model):
    """Specs compress wrote into files that then failed inside the decoder's trace (and took
    decompress_batch's other files with them): SD's leading spacing with steps_offset 1 at
    1000 steps starts at t=1000, past the schedule (diffusers: IndexError; the UNet ran at
    t=1000); a "trailing" t_start below every timestep; more steps than a schedule of 500
    training timesteps has. Refused at compress, a BitstreamError in the file's place at
    decode."""
    import dataclasses

    from fasdiff_jax.coding import BitstreamError
    from fasdiff_jax.coding import container as ct

    model, params = tiny_model
    with pytest.raises(ValueError, match="first DDIM timestep, 1000, is past the schedule's "
                                         "last, 999"):
        model.sampler_spec(steps=1000)
    assert model.sampler_spec(steps=999).steps == 999
    for sched, kw, what in ((dict(timestep_spacing="trailing", steps_offset=0),
                             dict(steps=4, t_start=100), "below every DDIM timestep"),
                            (dict(num_train_timesteps=500), dict(steps=600), r"steps 1\.\.500")):
        cfg = tiny.get_config().model
        cfg.scheduler.update(sched)
        with pytest.raises(ValueError, match=what):
            fasdiff.build(cfg).sampler_spec(**kw)
    img = skdata.astronaut()[100:164, 180:244]
    good = model.compress(params, img, steps=2)
    c = ct.unpack(good)
    bad = ct.pack(dataclasses.replace(c, sampler=dataclasses.replace(c.sampler, steps=1000)))
    with pytest.raises(BitstreamError, match="past the schedule"):
        model.decompress(params, bad)
    got = model.decompress_batch(params, [good, bad])
    assert isinstance(got[1], BitstreamError) and got[0].shape == img.shape


def test_decoding_does_not_depend_on_the_processs_prng_settings_or_compile_per_eta(tiny_model):
    """The noise key took the process's default PRNG: with jax_default_prng_impl=rbg or
    jax_threefry_partitionable=False one file decoded to other pixels (mean 54-66 grey levels
    apart). And eta was a static argument: each value compiled the sampler again (~6 s)."""
    model, params = tiny_model
    img = skdata.astronaut()[100:164, 180:244]
    data = model.compress(params, img, steps=2, eta=0.3, seed=11)
    want = model.decompress(params, data)
    for option, value in (("jax_default_prng_impl", "rbg"),
                          ("jax_threefry_partitionable", False)):
        before = getattr(jax.config, option)
        jax.config.update(option, value)
        try:
            np.testing.assert_array_equal(model.decompress(params, data), want)
        finally:
            jax.config.update(option, before)
    programs = model._cache["reconstruct"]._cache_size()
    other = model.decompress(params, model.compress(params, img, steps=2, eta=1.0, seed=11))
    assert model._cache["reconstruct"]._cache_size() == programs
    assert np.abs(other.astype(int) - want).max() > 0  # eta is used: another picture
    both = model.decompress_batch(params, [data, model.compress(params, img, steps=2, eta=1.0,
                                                                seed=11)])
    runs = []
    real = model._reconstruct
    with pytest.MonkeyPatch.context() as m:  # a large batch runs in runs of BATCH_PIXELS
        m.setattr(fasdiff.H, "BATCH_PIXELS", 2 * 64 * 64)
        m.setattr(model, "_reconstruct", lambda p, d: runs.append(len(d)) or real(p, d))
        assert len(model.decompress_batch(params, [data] * 5)) == 5
    assert runs == [2, 2, 1]
    for got, alone in zip(both, (want, other)):  # one sampler run, each file its own eta
        assert np.abs(got.astype(int) - alone).max() <= 1  # (a batch of 2: README's one level)
    assert np.abs(both[1].astype(int) - both[0]).max() > 1


def _tiny_sd_checkpoint(ckpt: Path, null_width: int | None = None) -> Path:
    """A converted SD folder of configs/tiny.py's shapes, random weights, no scheduler/."""
    base = fasdiff.build(tiny.get_config().model)
    for name, mod in (("unet", base.unet), ("vae", base.vae)):
        convert.save_component(str(ckpt / name), dict(tiny.get_config().model[name]),
                               convert.random_params(mod, 0))
    width = null_width or base.unet.cross_attention_dim
    convert.safetensors_io.save_file({"null_text": np.zeros((1, 5, width), np.float32)},
                                     ckpt / convert.NULL_TEXT_FILE)
    return ckpt


def test_an_sd_checkpoint_without_a_schedule_is_refused(tmp_path):
    """A folder converted without scheduler/ built Schedule.create's defaults (linear
    1e-4..0.02, epsilon), not SD's, when the config gives no scheduler (configs/celeba.py)."""
    ckpt = _tiny_sd_checkpoint(tmp_path / "ckpt")
    cfg = tiny.get_config().model
    cfg.sd_checkpoint = str(ckpt)
    alphas = lambda m: np.asarray(m.schedule.alphas_cumprod)  # noqa: E731
    tiny_sched = dict(cfg.scheduler)
    np.testing.assert_array_equal(alphas(fasdiff.build(cfg)),  # the config's schedule
                                  np.asarray(schedules.Schedule.create(**{
                                      k: v for k, v in tiny_sched.items()
                                      if k in schedules.Schedule.create.__code__.co_varnames
                                  }).alphas_cumprod))
    cfg.scheduler = {}  # as configs/celeba.py: read from the checkpoint
    with pytest.raises(ConversionError, match=re.escape(
            f"sd_checkpoint {ckpt}: no scheduler/scheduler_config.json and "
            f"config.model.scheduler is empty")) as e:
        fasdiff.build(cfg)
    assert "convert the pipeline again" in str(e.value)
    # a model trained on such a folder (resumed, restored to code) keeps what it trained with
    np.testing.assert_array_equal(alphas(fasdiff.build(cfg, new_run=False)),
                                  np.asarray(schedules.Schedule.create().alphas_cumprod))
    (ckpt / "scheduler").mkdir()
    (ckpt / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "prediction_type": "v_prediction"}))
    model = fasdiff.build(cfg)
    want = schedules.Schedule.create(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012)
    np.testing.assert_array_equal(alphas(model), np.asarray(want.alphas_cumprod))
    assert model.schedule.prediction_type == "v_prediction"


def test_a_null_text_of_another_width_is_refused_when_loaded(tmp_path):
    """A text encoder of another width than the UNet's cross-attention converted, and the
    first training step failed inside flax (ScopeParamShapeError)."""
    cfg = tiny.get_config().model
    cfg.sd_checkpoint = str(_tiny_sd_checkpoint(tmp_path / "ckpt", null_width=7))
    model = fasdiff.build(cfg)
    width = model.unet.cross_attention_dim
    with pytest.raises(ConversionError, match=re.escape(
            f"{tmp_path / 'ckpt' / convert.NULL_TEXT_FILE} does not fit {tmp_path / 'ckpt'}"
            f"/unet: null_text: (1, 5, 7) != (1, L, {width})")):
        model.frozen_params(jax.random.key(0))
    assert model.null_text_differences(np.zeros((1, 5, width))) == []
