"""diffusers-format (and CompressAI mbt2018-mean) weights -> our Flax parameter trees,
strictly; and the conversion CLI.

One generic rule maps a diffusers state-dict key onto our tree because our modules reuse
diffusers' attribute names (``down_blocks.0.resnets.1.conv1.weight`` ->
``down_blocks_0/resnets_1/conv1/kernel``). Layouts are converted by the target leaf: a
``kernel`` is transposed from torch's (out, in[, kh, kw]) to (in, out) / (kh, kw, in, out);
a ``scale`` or ``embedding`` is copied. Every tensor must be used and every parameter
filled with the right shape, or :class:`ConversionError` lists the offending keys.

Usage::

    python -m fasdiff_jax.convert --diffusers_dir /path/to/stable-diffusion-2-1-base --out ckpt/

converts a whole pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) into ``ckpt/{unet,vae}/`` (``config.json`` + ``params.safetensors``) and
``ckpt/null_text_embedding.safetensors`` (the empty-prompt CLIP embedding, computed once so
no text encoder is needed afterwards). A single model folder (one with a ``config.json``)
converts into ``--out`` directly. ``--variant fp16`` reads a pipeline's
``*.fp16.safetensors`` files (and ``*.safetensors.index.fp16.json`` sharded ones) instead.

    python -m fasdiff_jax.convert --compressai_checkpoint mbt2018-mean-3-xxxx.pth.tar --out mbt3/

converts a CompressAI ``MeanScaleHyperprior`` checkpoint into a folder that the codec and
evaluate commands take as ``--model_dir`` (the mbt2018-mean baseline, coded by our exact
integer entropy model; reading ``.pth`` files needs torch).

    python -m fasdiff_jax.convert --hyperprior_workdir runs/mbt_q4 --out mbt_q4/

writes the same kind of folder from the latest checkpoint of a baseline trained with
``configs/mbt2018_mean.py`` (its params only: a file to share, without the optimizer state).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import sys
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fasdiff_jax import files, safetensors_io
from fasdiff_jax.diffusion import schedules
from fasdiff_jax.errors import ConversionError, FasdiffError, UnsupportedConfigError, listed

# diffusers class name -> "module:Class" of our implementation (imported lazily).
MODEL_CLASSES: dict[str, str] = {
    "UNet2DConditionModel": "fasdiff_jax.models.sd.unet:UNet2DConditionModel",
    "AutoencoderKL": "fasdiff_jax.models.sd.vae:AutoencoderKL",
    "ControlNetModel": "fasdiff_jax.models.sd.controlnet:ControlNetModel",
    "CLIPTextModel": "fasdiff_jax.models.sd.text_encoder:CLIPTextModel",
    "MeanScaleHyperprior": "fasdiff_jax.models.hyperprior:MeanScaleHyperprior",  # ours, no diffusers
}

# Pre-0.14 diffusers attention names still found in SD VAE checkpoints.
_LEGACY_MODULE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("position_ids",)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_MAX_LISTED = 12

Params = dict[str, Any]


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no config.json (not a diffusers model folder)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable config: {e}") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: config is not a JSON object")
    channels = cfg.get("block_out_channels", [1])
    # Checked here, where the file is known: a string passed the models' length checks as
    # a sequence of characters and failed with a message about another field.
    if not (isinstance(channels, list) and channels
            and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
        raise ConversionError(f"{path}: config field block_out_channels must be a list of "
                              f"positive integers, got {channels!r}")
    return cfg


def class_name(cfg: Mapping[str, Any]) -> str:
    name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if not name:
        raise ConversionError("config.json names no model class (_class_name / architectures)")
    return name


def module_class(name: str) -> type[nn.Module]:
    if name not in MODEL_CLASSES:
        raise UnsupportedConfigError(
            f"model class {name!r} is not supported; supported: {sorted(MODEL_CLASSES)}"
        )
    mod, cls = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def module_from_config(cfg: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Our module for a diffusers/transformers config dict (``dtype=...`` etc. as overrides)."""
    return module_class(class_name(cfg)).from_diffusers_config(dict(cfg), **overrides)


def abstract_params(module: nn.Module) -> Params:
    """Shapes of ``module``'s params, without allocating them."""
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), *module.dummy_inputs())
    )
    return nn.unbox(variables["params"])


def random_params(module: nn.Module, seed: int = 0) -> Params:
    """Random params of ``module``'s shapes, drawn on the host with numpy.

    For *stand-ins* of pretrained networks (tiny configs, tests): XLA:CPU spends 20-30 s
    compiling the threefry graph of even a tiny UNet's ``init``; this takes milliseconds.
    Kernels are LeCun-normal, embeddings N(0, 0.02), norm scales 1, biases 0.
    """
    rng = np.random.default_rng(seed)

    def draw(path: tuple[str, ...], leaf: Any) -> np.ndarray:
        shape, name = tuple(leaf.shape), path[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        if name == "embedding":
            return (0.02 * rng.standard_normal(shape)).astype(leaf.dtype)
        if name == "scale":
            return np.ones(shape, leaf.dtype)
        if name == "bias":
            return np.zeros(shape, leaf.dtype)
        raise ValueError(f"random_params: no rule for parameter {'/'.join(path)}")

    flat = flatten_dict(abstract_params(module))
    return unflatten_dict({k: jnp.asarray(draw(k, v)) for k, v in flat.items()})


_VARIANT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model)\.([^.-]+)(?:-\d+-of-\d+)?"
                           r"\.safetensors$|^(?:diffusion_pytorch_model|model)\.safetensors"
                           r"\.index\.([^.]+)\.json$")


def _variant_names(name: str, variant: str | None) -> tuple[str, str]:
    """(weights file, sharded index) of ``name`` for ``variant``, as diffusers names them."""
    if not variant:
        return name, name + ".index.json"
    stem = name[:-len(".safetensors")]
    return f"{stem}.{variant}.safetensors", f"{name}.index.{variant}.json"


def read_weights(folder: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """The state dict of a diffusers/transformers folder, from safetensors only (no pickle);
    ``variant`` reads diffusers' variant files (``fp16``: ``*.fp16.safetensors``)."""
    for name in _WEIGHT_FILES:
        plain, index = (os.path.join(folder, n) for n in _variant_names(name, variant))
        if os.path.isfile(plain):
            return safetensors_io.load_file(plain)
        if os.path.isfile(index):
            state: dict[str, np.ndarray] = {}
            for shard in _index_shards(index):
                state.update(safetensors_io.load_file(os.path.join(folder, shard)))
            return state
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    hint = " (.bin pickles are not read: re-save with safe_serialization=True)" if any(
        f.endswith(".bin") for f in found) else ""
    variants = sorted({m.group(1) or m.group(2) for f in found if (m := _VARIANT_FILE.match(f))}
                      - {variant})
    if variants:  # diffusers saves e.g. diffusion_pytorch_model.fp16.safetensors
        hint += (f" (it has variant weights: pass --variant {variants[0]}"
                 + (f"; variants {variants}" if len(variants) > 1 else "") + ")")
    wanted = " or ".join(_variant_names(n, variant)[0] for n in _WEIGHT_FILES)
    raise ConversionError(f"{folder}: no {wanted} found{hint}; has {found}")


def _index_shards(index: str) -> list[str]:
    """The shard files a sharded checkpoint's ``*.safetensors.index.json`` names, or a
    :class:`ConversionError` naming the index (a damaged one raised a bare JSON error)."""
    try:
        with open(index) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{index}: unreadable sharded-weights index: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v for v in weight_map.values()):
        raise ConversionError(f"{index}: sharded-weights index has no \"weight_map\" object of "
                              f"tensor name -> shard file name")
    return sorted(set(weight_map.values()))


def key_to_path(key: str) -> tuple[tuple[str, ...], str]:
    """``a.0.b.weight`` -> (("a_0", "b"), "weight")."""
    *mods, leaf = key.split(".")
    parts: list[str] = []
    for m in mods:
        parts.extend(_LEGACY_MODULE_NAMES.get(m, m).split("."))
    path: list[str] = []
    for p in parts:
        if p.isdigit() and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), leaf


def _to_flax(leaf: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
            if len(target_shape) == 2 and value.shape[:2] == (1, 1):  # 1x1 conv -> dense
                value = value[0, 0]
        elif value.ndim == 2:
            value = value.T
            if len(target_shape) == 4:  # dense -> 1x1 conv
                value = value[None, None]
    return value


def convert_state_dict(
    state: Mapping[str, np.ndarray], expected: Params, *, source: str = "checkpoint"
) -> Params:
    """Map a torch state dict onto the tree ``expected`` (arrays or ShapeDtypeStructs)."""
    want = flatten_dict(expected)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, twice = [], [], []
    source_key: dict[tuple[str, ...], str] = {}  # which checkpoint key filled each parameter
    for key in sorted(state):
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        mods, leaf = key_to_path(key)
        if leaf == "weight":
            candidates = ("kernel", "scale", "embedding")
        elif leaf == "gamma":
            candidates = ("scale",)
        elif leaf == "beta":
            candidates = ("bias",)
        else:
            candidates = (leaf,)
        target = next((mods + (c,) for c in candidates if mods + (c,) in want), None)
        if target is None:
            unexpected.append(key)
            continue
        if target in source_key:  # e.g. a VAE with both to_q.weight and legacy query.weight
            twice.append(f"{source_key[target]} and {key}: both map to {'/'.join(target)}")
            continue
        source_key[target] = key
        shape = tuple(want[target].shape)
        value = _to_flax(target[-1], np.asarray(state[key]), shape)
        if tuple(value.shape) != shape:
            mismatched.append(
                f"{key}: checkpoint {tuple(state[key].shape)} -> {'/'.join(target)} "
                f"needs {shape}"
            )
            continue
        out[target] = value.astype(want[target].dtype)
    missing = ["/".join(k) for k in want if k not in out]
    problems = []
    for title, items in (("keys for one parameter", twice), ("shape mismatch", mismatched),
                         ("missing from checkpoint", missing),
                         ("unexpected in checkpoint", unexpected)):
        if items:
            listed = "\n    ".join(items[:_MAX_LISTED])
            more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            problems.append(f"  {len(items)} {title}:\n    {listed}{more}")
    if problems:
        raise ConversionError(f"{source} does not match the architecture:\n" + "\n".join(problems))
    return unflatten_dict(out)


def load_diffusers(folder: str, variant: str | None = None,
                   **overrides: Any) -> tuple[nn.Module, Params]:
    """``(module, params)`` for a diffusers ``unet/``, ``vae/`` or ``controlnet/`` folder
    (``variant``: see :func:`read_weights`).

    ``overrides`` go to the module (e.g. ``dtype=jnp.bfloat16``); params stay float32.
    """
    cfg = read_config(folder)
    module = module_from_config(cfg, **overrides)
    expected = abstract_params(module)
    state = read_weights(folder, variant)
    # A class may accept several key spellings of one checkpoint format (a classmethod hook).
    if hasattr(type(module), "canonical_state_dict"):
        state = type(module).canonical_state_dict(state)
    params = convert_state_dict(state, expected, source=folder)
    return module, jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------------------
# Our converted checkpoint: <component>/config.json + <component>/params.safetensors.

PARAMS_FILE = "params.safetensors"
NULL_TEXT_FILE = "null_text_embedding.safetensors"


def save_component(folder: str, cfg: Mapping[str, Any], params: Params) -> None:
    """``folder/config.json`` + ``folder/params.safetensors``, each written atomically, and
    as a pair: a failed write (a full disk) leaves the folder's old pair, whole and matched."""
    os.makedirs(folder, exist_ok=True)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    config = json.dumps(dict(cfg), indent=2, sort_keys=True).encode()
    params_path = os.path.join(folder, PARAMS_FILE)
    config_path = os.path.join(folder, "config.json")
    for path in (params_path, config_path):  # a rename onto it would fail after the other's
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    files.remove_stale_temps(folder, {PARAMS_FILE, "config.json"})  # a killed run's (GBs)

    # Params go to their temporary file first; the config is written and renamed in place
    # only once they are whole, and the params renamed last. Any failed write thus leaves
    # the old config and old params (the temporaries removed); only a kill between the two
    # renames can pair a new config with old params, which load_component's shape check
    # reports unless both have the same shapes.
    def write_pair(params_tmp: str) -> None:
        safetensors_io.write_file(flat, params_tmp)
        files.write_atomically(config_path, config)

    files.write_atomically(params_path, write_pair)


def load_component(folder: str, **overrides: Any) -> tuple[nn.Module, Params]:
    """Load what :func:`save_component` wrote, checking every shape against the module.

    The params are numpy arrays memory-mapped from the file, not device arrays: whoever places
    them (``jax.device_put`` with the train loop's shardings) copies each device's shard
    straight from the file, so no device holds a full staging copy of a sharded weight."""
    cfg = read_config(folder)
    try:
        module = module_from_config(cfg, **overrides)
    except ConversionError as e:  # the class or a field: name the file it came from
        raise type(e)(f"{os.path.join(folder, 'config.json')}: {e}") from e
    path = os.path.join(folder, PARAMS_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no {PARAMS_FILE}; convert the weights first "
                              f"(python -m fasdiff_jax.convert)")
    flat = {tuple(k.split("/")): v for k, v in safetensors_io.load_file(path).items()}
    check_params(module, flat, path)
    return module, unflatten_dict(flat)


def param_differences(module: nn.Module, flat: Mapping[tuple[str, ...], Any]
                      ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) parameter names of ``flat`` for ``module``, each
    at most :data:`_MAX_LISTED` long."""
    want = flatten_dict(abstract_params(module))
    missing = sorted("/".join(k) for k in set(want) - set(flat))
    extra = sorted("/".join(k) for k in set(flat) - set(want))
    bad = sorted("/".join(k) for k in set(want) & set(flat) if want[k].shape != np.shape(flat[k]))
    return missing[:_MAX_LISTED], extra[:_MAX_LISTED], bad[:_MAX_LISTED]


def check_params(module: nn.Module, flat: Mapping[tuple[str, ...], Any], where: str) -> None:
    """Every parameter of ``module`` present with its shape, nothing else, or a
    :class:`ConversionError` listing the offenders."""
    missing, extra, bad = param_differences(module, flat)
    if missing or extra or bad:
        raise ConversionError(
            f"{where} does not match its config: missing {missing}, unexpected {extra}, "
            f"wrong shape {bad}"
        )


def load_null_text_embedding(ckpt_dir: str) -> np.ndarray:
    path = os.path.join(ckpt_dir, NULL_TEXT_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{ckpt_dir}: no {NULL_TEXT_FILE}; convert the pipeline first")
    return np.asarray(safetensors_io.load_file(path)["null_text"])


SD_FILES = ("unet/config.json", f"unet/{PARAMS_FILE}", "vae/config.json", f"vae/{PARAMS_FILE}",
            NULL_TEXT_FILE)  # what a run's frozen parts are read from
_SD_FINGERPRINTS: dict[tuple, str] = {}
SD_FINGERPRINT_MEMO = "sd_fingerprints.json"  # in fasdiff_jax.cache_home()


def sd_fingerprint(ckpt_dir: str) -> str:
    """sha256 of a converted SD folder's :data:`SD_FILES` (names, sizes, bytes): names the
    frozen weights a run was trained with wherever the folder is copied to. Reads every byte
    (files in the page cache hash at ~1.35 GB/s on this project's CPU: ~2.8 s for SD-2.1's
    3.8 GB), so the result is memoised per file path, size, inode and modification and change
    times, in this process and in ``sd_fingerprints.json`` under
    :func:`fasdiff_jax.cache_home` for the next command. Any write to a file changes its
    change time (which no tool sets back), so a memo never outlives the bytes it names; a
    copied folder is hashed again."""
    if not os.path.isdir(ckpt_dir):
        raise ConversionError(f"sd_checkpoint {ckpt_dir!r} is not a folder (convert a diffusers "
                              f"SD pipeline with python -m fasdiff_jax.convert)")
    paths = [os.path.join(os.path.abspath(ckpt_dir), rel) for rel in SD_FILES]
    try:
        key = tuple((p, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                    for p in paths for st in [os.stat(p)])
    except OSError as e:
        raise ConversionError(f"{ckpt_dir}: {e.filename} is missing ({e.strerror}); convert "
                              f"the SD pipeline again (python -m fasdiff_jax.convert)") from e
    if key not in _SD_FINGERPRINTS:
        memo_key = json.dumps(key)
        memo = _read_fingerprint_memo()
        if memo.get(memo_key) is None:
            h = hashlib.sha256()
            for rel, (path, size, *_) in zip(SD_FILES, key):
                h.update(f"{rel}\0{size}\0".encode())
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)
            memo[memo_key] = h.hexdigest()
            _write_fingerprint_memo(memo)
        _SD_FINGERPRINTS[key] = memo[memo_key]
    return _SD_FINGERPRINTS[key]


def _fingerprint_memo_path() -> str:
    from fasdiff_jax import cache_home

    return os.path.join(cache_home(), SD_FINGERPRINT_MEMO)


def _read_fingerprint_memo() -> dict[str, str]:
    try:
        with open(_fingerprint_memo_path()) as f:
            memo = json.load(f)
        return {k: v for k, v in memo.items() if isinstance(v, str)} if isinstance(memo, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: hash, and write a good one
        return {}


def _write_fingerprint_memo(memo: dict[str, str]) -> None:
    """Whole or not at all (a concurrent command may write too: the last one wins, and either
    memo is right); the newest 64 folders' entries kept. Unwritable: no memo, no error."""
    with contextlib.suppress(OSError):
        files.write_atomically(_fingerprint_memo_path(),
                               json.dumps(dict(list(memo.items())[-64:])).encode())


COMPONENT_FILES = ("config.json", PARAMS_FILE)  # what save_component writes


def check_component_out(out: str, class_name: str) -> None:
    """A one-model ``out`` (a hyperprior, one diffusers model) may hold nothing but an
    earlier conversion of the same class: convert replaced a training workdir's config.json
    (the run no longer loaded) and wrote beside another tool's files, exit 0."""
    if not os.path.isdir(out):
        return
    foreign = [e for e in sorted(os.listdir(out))  # (a folder in their place: save_component)
               if not (e in COMPONENT_FILES or files.is_temp_of(e, COMPONENT_FILES))]
    if foreign:
        raise ConversionError(f"--out {out}: holds files convert did not write ({listed(foreign)})"
                              f"; write the conversion to a new or empty folder")
    config = os.path.join(out, "config.json")
    if os.path.isfile(config):
        try:
            with open(config) as f:
                have = json.load(f).get("_class_name")
        except (OSError, ValueError, AttributeError):
            have = None
        if have != class_name:
            raise ConversionError(f"--out {out}: its config.json is not a {class_name} "
                                  f"conversion (_class_name {have!r}); write the conversion "
                                  f"to a new or empty folder")


def check_out(out: str, src: str | None = None) -> None:
    """Refuse an ``out`` that is a file, or that is, holds or lies in the input folder ``src``,
    before anything is written: converting a pipeline into its own folder wrote
    params.safetensors into the source's unet/ and vae/, then failed copying a file onto
    itself. An empty ``out`` (``--out ""``) is refused: it wrote into the current folder."""
    if not out.strip():
        raise ConversionError("--out is empty: name the output folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--out {out}: is a file, not a folder")
    if src is None or "://" in src:
        return
    o, i = os.path.realpath(out), os.path.realpath(src)
    if o == i:
        raise ConversionError(f"--out {out}: is the input folder {src}; write the conversion "
                              f"to a new folder")
    if os.path.commonpath([o, i]) in (o, i):
        inner = "lies inside the input folder" if os.path.commonpath([o, i]) == i else \
            "holds the input folder"
        raise ConversionError(f"--out {out}: {inner} {src}; write the conversion to a folder "
                              f"outside it")


# The scheduler fields fasdiff.build passes to schedules.Schedule.create, and their JSON types.
_NUMBER, _INT, _STR, _BOOL = (int, float), (int,), (str,), (bool,)
_SCHEDULER_FIELDS: dict[str, tuple[type, ...]] = {
    "num_train_timesteps": _INT, "beta_start": _NUMBER, "beta_end": _NUMBER,
    "beta_schedule": _STR, "prediction_type": _STR, "timestep_spacing": _STR,
    "steps_offset": _INT, "set_alpha_to_one": _BOOL, "clip_sample": _BOOL,
    "clip_sample_range": _NUMBER, "rescale_betas_zero_snr": _BOOL, "variance_type": _STR,
}
_TYPE_NAMES = {_NUMBER: "a number", _INT: "an integer", _STR: "a string", _BOOL: "true or false"}


def read_scheduler_config(path: str) -> dict:
    """A pipeline's ``scheduler_config.json``, checked before convert copies it: training
    builds its noise schedule from it, where a damaged file failed with a JSON error that
    named no file. The schedule is built once here, so its own checks run too."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable scheduler config: {e}") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: scheduler config is not a JSON object")
    for key, types in _SCHEDULER_FIELDS.items():
        value = cfg.get(key, types[0]())  # absent: the default applies
        if isinstance(value, bool) and types != _BOOL or not isinstance(value, types):
            raise ConversionError(f"{path}: scheduler config field {key} must be "
                                  f"{_TYPE_NAMES[types]}, got {value!r}")
    if cfg.get("num_train_timesteps", 1) < 1 or cfg.get("steps_offset", 0) < 0:
        raise ConversionError(f"{path}: scheduler config needs num_train_timesteps >= 1 and "
                              f"steps_offset >= 0, got {cfg.get('num_train_timesteps')} and "
                              f"{cfg.get('steps_offset')}")
    for key in ("beta_start", "beta_end"):
        if key in cfg and not 0 <= cfg[key] < 1:
            raise ConversionError(f"{path}: scheduler config field {key} must be in [0, 1), "
                                  f"got {cfg[key]!r}")
    accepted = inspect.signature(schedules.Schedule.create).parameters
    try:
        sched = schedules.Schedule.create(**{k: v for k, v in cfg.items() if k in accepted})
    except (ValueError, TypeError) as e:  # UnsupportedConfigError is a ValueError
        raise ConversionError(f"{path}: {e}") from e
    alphas = np.asarray(sched.alphas_cumprod)
    if not np.all((alphas > 0) & (alphas <= 1)):
        raise ConversionError(f"{path}: the scheduler config's betas give cumulative alphas "
                              f"outside (0, 1] (each beta must be in [0, 1))")
    return cfg


# What a pipeline conversion writes into ``--out`` (and nothing else): the folder is
# replaced as a whole, so these are also all that a later conversion may replace.
PIPELINE_FILES = ("unet/config.json", f"unet/{PARAMS_FILE}", "vae/config.json",
                  f"vae/{PARAMS_FILE}", NULL_TEXT_FILE, "scheduler/scheduler_config.json")
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
_ASIDE = ".old"  # ``OUT.old.tmp-HOST-PID``: a previous conversion moved aside by the swap


def _foreign_files(out: str) -> list[str]:
    """What ``out`` holds besides a previous pipeline conversion's :data:`PIPELINE_FILES`
    (and the temporary names of those a killed run left): files convert must not delete."""
    parts: dict[str, set[str]] = {}
    for rel in PIPELINE_FILES:
        head, _, tail = rel.rpartition("/")
        parts.setdefault(head, set()).add(tail)
    top = parts.pop("")
    foreign = []
    for entry in sorted(os.listdir(out)):
        path = os.path.join(out, entry)
        if entry in parts and os.path.isdir(path) and not os.path.islink(path):
            for inner in sorted(os.listdir(path)):
                ours = inner in parts[entry] and os.path.isfile(os.path.join(path, inner))
                if not (ours or files.is_temp_of(inner, parts[entry])):
                    foreign.append(os.path.join(path, inner))
        elif not (entry in top and os.path.isfile(path) or files.is_temp_of(entry, top)):
            foreign.append(path)
    return foreign


def _recover_swap(dest: str) -> None:
    """Finish what a killed conversion left around ``dest``: its half-written new set
    (``dest.tmp-HOST-PID``) goes; a previous set it had moved aside (``dest.old.tmp-...``)
    goes too where ``dest`` holds the new one, and is put back where the kill came between
    the swap's two renames (no ``dest``). Other machines' and live runs' stay."""
    parent, name = os.path.split(dest)
    parent = parent or "."
    if not os.path.lexists(dest):
        for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
            if files.is_leftover(parent, entry, {name + _ASIDE}):
                os.rename(os.path.join(parent, entry), dest)
                break
    files.remove_stale_temps(parent, {name, name + _ASIDE})


def _check_pipeline(src: str) -> tuple[dict, dict]:
    """Every part a conversion needs, checked before any weights are read or written:
    (unet config, vae config). A pipeline without its scheduler config trained with another
    noise schedule (the config's defaults), one without a text encoder or tokenizer had no
    empty-prompt embedding (found only when training started), and a text encoder of
    another width than the UNet's cross-attention failed in the first training step."""
    if not os.path.isdir(src):
        if os.path.isfile(src):
            raise ConversionError(
                f"--diffusers_dir {src}: is a file; single-file checkpoints (.safetensors, "
                f".ckpt) are not supported: load it with diffusers' "
                f"StableDiffusionPipeline.from_single_file and save_pretrained it to a folder")
        raise ConversionError(f"--diffusers_dir {src}: does not exist")
    sched = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):  # a damaged one is named first
        read_scheduler_config(sched)
    missing = [f"{p}/" for p in _PIPELINE_PARTS if not os.path.isdir(os.path.join(src, p))]
    if not os.path.isfile(sched):
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise ConversionError(f"{src}: pipeline folder has no {', '.join(missing)} (a diffusers "
                              f"Stable Diffusion pipeline folder has them all)")
    from fasdiff_jax.models.sd import text_encoder

    text_encoder.empty_prompt_ids(os.path.join(src, "tokenizer"))  # refused here, not later
    unet_cfg, vae_cfg = (read_config(os.path.join(src, p)) for p in ("unet", "vae"))
    text_cfg = read_config(os.path.join(src, "text_encoder"))
    width = module_from_config(unet_cfg).cross_attention_dim
    if text_cfg.get("hidden_size") != width:
        raise ConversionError(
            f"{src}: text_encoder hidden_size {text_cfg.get('hidden_size')} != unet "
            f"cross_attention_dim {width}: the text encoder is not this UNet's")
    return unet_cfg, vae_cfg


def convert_pipeline(src: str, out: str, variant: str | None = None) -> dict[str, str]:
    """Convert a diffusers SD pipeline folder into ``out``; returns what was written.

    Every part is read and checked first; the whole set (:data:`PIPELINE_FILES`) is then
    written to ``OUT.tmp-HOST-PID`` next to ``out`` and swapped in: an existing ``out`` is
    renamed to ``OUT.old.tmp-HOST-PID``, the new set renamed to ``out``, the old removed.
    A failed write (a full disk) removes the new set and leaves the old ``out`` untouched;
    so does a kill before the swap (its temporary folder is removed by the next run). A
    kill between the two renames leaves no ``out``, the whole old set in
    ``OUT.old.tmp-HOST-PID`` and the whole new one in ``OUT.tmp-HOST-PID``: the next run
    puts the old set back before it starts (or rename the new one to ``out`` by hand).
    An ``out`` holding anything else than a previous conversion's files is refused:
    convert replaces the folder, and must not delete what it did not write."""
    check_out(out, src)
    dest = os.path.realpath(out)  # a link (also "link/") is followed: its target is replaced
    _check_swappable(out, dest)
    _recover_swap(dest)  # first: a run that then fails puts a killed run's old set back too
    unet_cfg, vae_cfg = _check_pipeline(src)
    if os.path.isdir(dest):
        foreign = _foreign_files(dest)
        if foreign:
            raise ConversionError(
                f"--out {out}: holds files that a pipeline conversion did not write: "
                f"{listed(foreign)}; convert replaces the whole folder: move them, or "
                f"choose a new folder")
    from fasdiff_jax.models.sd import text_encoder

    unet = load_diffusers(os.path.join(src, "unet"), variant)[1]
    vae = load_diffusers(os.path.join(src, "vae"), variant)[1]
    null = np.asarray(text_encoder.null_text_embedding_from_pipeline(src, variant), np.float32)
    with open(os.path.join(src, "scheduler", "scheduler_config.json"), "rb") as f:
        sched = f.read()

    tmp = files.temp_name(dest)
    try:
        save_component(os.path.join(tmp, "unet"), unet_cfg, unet)
        save_component(os.path.join(tmp, "vae"), vae_cfg, vae)
        safetensors_io.save_file({"null_text": null}, os.path.join(tmp, NULL_TEXT_FILE))
        files.write_atomically(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
        _swap_in(tmp, dest)
    except OSError as e:  # named by the temporary folder, gone when the user reads it: out
        name = e.filename if isinstance(e.filename, str) else ""
        if e.errno is None or not (name == tmp or name.startswith(tmp + os.sep)):
            raise
        raise OSError(e.errno, e.strerror or str(e), os.path.join(out, name[len(tmp) + 1:])
                      if name != tmp else out) from e
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {p: os.path.join(out, p) for p in ("unet", "vae")} | {
        "null_text": os.path.join(out, NULL_TEXT_FILE),
        "scheduler": os.path.join(out, "scheduler")}


def _check_swappable(out: str, dest: str) -> None:
    """The new set is written beside ``dest`` and renamed into place: refuse, before anything
    is read, an ``out`` whose parent folder is not writable, one that is a mount point (a
    Docker volume: the set was written on another file system, then the rename failed with
    EBUSY) and the current folder or one holding it."""
    parent = os.path.dirname(dest)
    if os.path.isdir(dest) and os.path.ismount(dest):
        raise ConversionError(f"--out {out}: is a mount point; convert writes the new set beside "
                              f"--out and renames it into place: give a folder inside it "
                              f"(e.g. {os.path.join(out, 'sd')})")
    if os.path.commonpath([dest, os.path.realpath(os.getcwd())]) == dest:
        raise ConversionError(f"--out {out}: is the current folder or holds it; convert "
                              f"replaces --out as a whole: give another folder")
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"--out {out}: its folder {parent} is not writable; convert "
                              f"writes the new set beside --out and renames it into place")


def _swap_in(new: str, dest: str) -> None:
    """Rename the folder ``new`` to ``dest``, a previous ``dest`` aside first and removed
    after (see :func:`convert_pipeline` for what a kill between the renames leaves)."""
    if not os.path.isdir(dest):
        os.rename(new, dest)
        return
    aside = files.temp_name(dest + _ASIDE)
    shutil.copymode(dest, new)  # the folder's permissions (setgid, group write) stay
    os.rename(dest, aside)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(aside, dest)  # the old set back in place
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _load_failure(e: Exception) -> str:
    """torch's weights-only unpickling error without its advice to load with
    ``weights_only=False``, which would run whatever code the file holds."""
    text = str(e)
    if type(e).__name__ == "UnpicklingError" and "weights_only" in text:
        detail = [l.strip() for l in text.splitlines()
                  if l.strip() and not any(w in l for w in ("weights_only", "Please file",
                                                            "documentation of torch.load"))]
        return ("torch.load with weights_only=True, which reads tensors and containers "
                f"only, could not read it: {detail[-1] if detail else 'UnpicklingError'}; "
                "it is not a state dict saved by torch.save, or it holds other objects, "
                "which are refused rather than run")
    return f"{type(e).__name__}: {text}"


def read_compressai_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A CompressAI checkpoint's state dict as numpy arrays.

    ``.safetensors`` and ``.npz`` are read without torch; anything else (CompressAI's
    ``.pth.tar`` zoo files, its training script's checkpoints) with torch's loader in its
    ``weights_only=True`` mode, which unpickles tensors and containers only. A training checkpoint's
    ``{"state_dict": ...}`` wrapper and DataParallel's ``module.`` prefixes are removed."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: " + ("a folder, not a checkpoint file"
                                             if os.path.isdir(path) else "no such file"))
    try:
        if path.endswith(".safetensors"):
            sd: Any = safetensors_io.load_file(path)
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                sd = {k: f[k] for k in f.files}
        else:
            try:
                import torch
            except ImportError as e:
                raise ConversionError(f"{path}: reading a torch checkpoint needs torch (pip install "
                                      f"torch), or save its state dict as .safetensors") from e
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - torch/zip/pickle raise many types for a bad file
        raise ConversionError(f"{path}: not a readable checkpoint ({_load_failure(e)})") from e
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ConversionError(f"{path}: entry {k!r} is named by a {type(k).__name__}, "
                                  f"not a string: not a state dict")
        if not hasattr(v, "shape"):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if str(v.dtype) == "torch.bfloat16":  # no numpy type; float32 holds it exactly
                v = v.float()
            v = v.numpy()
        else:
            v = np.asarray(v)
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def convert_compressai(path: str, out: str) -> dict[str, Any]:
    """A CompressAI ``MeanScaleHyperprior`` (mbt2018-mean) checkpoint -> a ``--model_dir``
    folder of our hyperprior (N and M from the weights' shapes); returns its config."""
    from fasdiff_jax.models import hyperprior

    params = hyperprior.params_from_compressai(read_compressai_checkpoint(path))
    p = params["params"]
    model = hyperprior.MeanScaleHyperprior(N=p["g_a_0"]["kernel"].shape[-1],
                                           M=p["g_a_6"]["kernel"].shape[-1],
                                           hs_activation="leaky_relu")
    missing, extra, bad = param_differences(model, flatten_dict(p))
    if missing or extra or bad:  # (names are checked by params_from_compressai)
        raise ConversionError(f"{path}: not an mbt2018-mean checkpoint: "
                              + (f"missing {missing}, unexpected {extra}, " if missing or extra
                                 else "its tensors have the names but not the shapes (a "
                                      "bmshj2018 scale hyperprior's h_s, say): ")
                              + f"wrong shape {bad}")
    _save_hyperprior(out, model, params, path)
    return hyperprior.model_config(model)


def _save_hyperprior(out: str, model: Any, params: dict, source: str) -> None:
    """Refused before writing: NaN/Inf weights (a diverged run; the codec refused the folder
    only when loading it) and an ``out`` holding other files (a training workdir's
    config.json was replaced, the run unusable)."""
    from fasdiff_jax.models import hyperprior

    try:
        hyperprior.check_finite_weights(params["params"])
    except ConversionError as e:
        raise ConversionError(f"{source}: {e}") from None
    check_component_out(out, "MeanScaleHyperprior")
    hyperprior.save_model(out, model, params)


def export_hyperprior(workdir: str, out: str, step: int | str | None = None,
                      weights: str | None = None) -> tuple[dict[str, Any], int, str]:
    """Checkpoint ``step`` (default the latest; ``"best"``) of an mbt2018-mean run
    (``model.kind="hyperprior"``), its ``weights`` ("ema", "params", default auto: see
    :func:`train.restore_for_inference`) -> a ``--model_dir`` folder; returns its config,
    the step and which weights."""
    from fasdiff_jax import train
    from fasdiff_jax.models import hyperprior

    # convert has no --config flag: the run's saved config is all it can use
    config = train.load_run_config(workdir, advice="convert exports a checkpoint of a run "
                                   "trained with configs/mbt2018_mean.py")
    model, params, step, weights = train.restore_for_inference(config, workdir, step, weights)
    if not isinstance(model, hyperprior.TrainableHyperprior):
        raise ConversionError(f"{workdir}: a {type(model).__name__} run, not the mbt2018-mean "
                              f"baseline (config.model.kind='hyperprior')")
    _save_hyperprior(out, model.model, params[model.KEY], f"{workdir} step {step}")
    return hyperprior.model_config(model.model), step, weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasdiff_jax.convert",
                                     description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--diffusers_dir",
                     help="a diffusers pipeline folder, or one model folder with config.json")
    src.add_argument("--compressai_checkpoint",
                     help="a CompressAI mbt2018-mean checkpoint (.pth.tar/.pth, .safetensors, .npz)")
    src.add_argument("--hyperprior_workdir",
                     help="the workdir of a baseline trained with configs/mbt2018_mean.py")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--variant", default=None,
                        help="read the weights variant NAME (e.g. fp16: the "
                             "*.fp16.safetensors files) of --diffusers_dir")
    from fasdiff_jax.codec import checkpoint_step

    parser.add_argument("--step", type=checkpoint_step, default=None,
                        help="which checkpoint of --hyperprior_workdir: a step, or 'best' (the "
                             "best held-out evaluation's); default: the latest")
    parser.add_argument("--weights", choices=("auto", "ema", "params"), default=None,
                        help="which weights of that checkpoint (--hyperprior_workdir): 'ema', "
                             "'params'; default auto: the moving average where the run kept one")
    args = parser.parse_args(argv)
    if args.variant is not None and not args.diffusers_dir:
        parser.error("--variant applies to --diffusers_dir only")
    if (args.step is not None or args.weights is not None) and not args.hyperprior_workdir:
        parser.error("--step and --weights apply to --hyperprior_workdir only")
    try:
        if args.compressai_checkpoint:
            check_out(args.out)
            cfg = convert_compressai(args.compressai_checkpoint, args.out)
            written = {f"MeanScaleHyperprior N={cfg['N']} M={cfg['M']}": args.out}
        elif args.hyperprior_workdir:
            check_out(args.out, args.hyperprior_workdir)
            cfg, step, weights = export_hyperprior(args.hyperprior_workdir, args.out, args.step,
                                                   args.weights)
            written = {f"MeanScaleHyperprior N={cfg['N']} M={cfg['M']} (step {step}, {weights} "
                       f"weights)": args.out}
        elif os.path.isfile(os.path.join(args.diffusers_dir, "config.json")):
            check_out(args.out, args.diffusers_dir)
            cfg = read_config(args.diffusers_dir)
            check_component_out(args.out, cfg.get("_class_name"))
            _, params = load_diffusers(args.diffusers_dir, args.variant)
            save_component(args.out, cfg, params)
            written = {"model": args.out}
        else:
            written = convert_pipeline(args.diffusers_dir, args.out, args.variant)
    except FasdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out under a file, or a folder we may not write in
        where = f"{e.filename}: {e.strerror or e}" if e.filename else f"{args.out}: {e}"
        print(f"error: {where}", file=sys.stderr)
        return 2
    for what, where in written.items():
        print(f"{what}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
