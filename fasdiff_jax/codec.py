"""Compress and decompress image files with a trained FaSDiff model (or the mbt2018-mean baseline).

    python -m fasdiff_jax.codec compress   --workdir=DIR face.png face.fsd
    python -m fasdiff_jax.codec decompress --workdir=DIR face.fsd out.png
    # many files, one model load and one compile per image size:
    python -m fasdiff_jax.codec compress   --workdir=DIR a.png photos/ --out_dir=fsd/
    python -m fasdiff_jax.codec decompress --workdir=DIR fsd/ --out_dir=png/
    # the mbt2018-mean baseline (a folder from ``python -m fasdiff_jax.convert --compressai_checkpoint``):
    python -m fasdiff_jax.codec compress   --model_dir=mbt3/ face.png face.fsd
    # what a file's header says (codec, size, fingerprint, sampler spec), no model needed:
    python -m fasdiff_jax.codec info face.fsd fsd/
    # one checkpoint of a run (--step=N|best, default the latest) as a folder to share for
    # coding: its config and trained params, no optimizer state; use it as --workdir
    python -m fasdiff_jax.codec export --workdir=DIR --step=best model/

The model is the training run's config (``DIR/config.json``, every ``--config.*`` override
of the run included; ``--config=FILE`` names another) with its frozen SD parts (from
``model.sd_checkpoint`` or the config's seed) and the trained parts from the latest
checkpoint in ``--workdir`` (a FaSDiff run, or the mbt2018-mean baseline trained with
``configs/mbt2018_mean.py``), or with ``--model_dir`` a converted mean-scale hyperprior (files
carry their codec id and model fingerprint, so no model decodes another's files). Where the
run kept a moving average of its params (``train.ema_decay``) that is what codes, unless
``--weights=params`` asks for the last update's.
``compress`` takes any image Pillow reads (odd modes and EXIF rotation handled; greyscale
files are coded as one channel and come back greyscale); ``decompress`` writes an image of
the original size in the format the output name's extension names: PNG, WebP (written
lossless), TIFF, BMP or PPM hold the decoded pixels exactly; JPEG is written at quality 95
and reported as lossy; others (GIF, ICO, ...) are refused (:data:`IMAGE_FORMATS`).
``--steps/--t_start/--eta/--seed`` override the config's sampler spec, which is stored in
the file. ``--sd_checkpoint=DIR`` names where the run's converted SD weights are on this
machine when they are not at the path the run was trained with (checked by content).

With ``--out_dir`` every input (a file, or a folder searched recursively for images, or for
``.fsd`` files when decompressing) is written to ``out_dir`` under its own name (for folders,
its path relative to the folder) with the suffix ``.fsd`` or ``.png``. A file that fails is
reported and skipped; the others still run. Outputs appear whole or not at all (written to a
temporary name, then renamed), so ``--skip_existing`` resumes an interrupted run. The outputs'
folders are checked writable before the model loads; a full disk, quota or read-only file
system part-way stops the run (every later file would fail alike), the written files kept.
Both commands take ``--batch_size`` inputs (default 8) at a time: ``compress`` runs images of
one padded size through the analysis transforms (FaSDiff: VAE encoder and compressor) in one
device call (at most ``hyperprior.BATCH_PIXELS``, 4.2 M pixels, per call), ``decompress`` runs FaSDiff files of one size and sampler spec through the sampler
together (each with its own seed's noise). A file then codes as it would alone up to float
rounding of batched device math: byte-identical files and decodes within one grey level in
the tests on CPU.

Errors (unreadable image, malformed file, other model's file, missing checkpoint) are one
readable line each; the exit status is 2 when any file failed, else 0. Write errors name
the output. A stdout that fails stops the command: quietly with status 141 where its reader
left (``| head``, as cat does), else ``error: stdout: ...`` and 2.

Compiled programs are kept for the next run (``--compile_cache=DIR|none``, default
``~/.cache/fasdiff_jax/xla``; :mod:`fasdiff_jax.compile_cache`): a later run with the same
model and image size starts coding without compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.util
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fasdiff_jax import compile_cache
from fasdiff_jax.errors import FasdiffError, OutOfMemoryError, is_out_of_memory, listed
from fasdiff_jax.files import (check_writable, is_out_of_space, remove_stale_temps,
                               write_atomically)

SUFFIX = {"compress": ".fsd", "decompress": ".png"}
# The status a shell reports for a command killed by SIGPIPE (``cat big | head``).
EXIT_BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)


def load_config(path: str) -> Any:
    """``get_config()`` of the Python file at ``path``; whatever keeps it from giving a config
    with a ``model`` section (a syntax error, an exception, no ``get_config``) is a
    :class:`FasdiffError` naming the file."""
    import ml_collections

    spec = importlib.util.spec_from_file_location("fasdiff_codec_config", path)
    if spec is None or spec.loader is None:
        raise FasdiffError(f"{path}: not a Python config file")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        if not callable(getattr(mod, "get_config", None)):
            raise FasdiffError("it defines no get_config()")
        config = mod.get_config()
    except FasdiffError as e:
        raise FasdiffError(f"--config={path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a user's file may raise anything
        raise FasdiffError(f"--config={path}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict) or not isinstance(
            config.get("model"), ml_collections.ConfigDict):
        raise FasdiffError(f"--config={path}: get_config() must return an ml_collections "
                           f"ConfigDict with a model section, got {type(config).__name__}")
    return config


SAMPLER_FLAGS = (("steps", int), ("t_start", int), ("eta", float), ("seed", int))
SAMPLER_HELP = {"steps": "DDIM steps, 1..1000", "t_start": "the timestep it starts from, 0 = "
                "from pure noise", "eta": "DDIM's eta in [0, 1] (0: deterministic)",
                "seed": "the noise's seed, 0..2**64-1"}
FASDIFF_FLAGS = ("sd_checkpoint", *(name for name, _ in SAMPLER_FLAGS))
MODEL_FLAGS = ("config", "workdir", "model_dir", "step", "weights", *FASDIFF_FLAGS)


def given_flags(args: argparse.Namespace, names: tuple[str, ...] | list[str]) -> str:
    """``"--a --b"`` for those of ``names`` set on the command line ("" if none)."""
    return " ".join(f"--{n}" for n in names if getattr(args, n) is not None)


def checkpoint_step(text: str) -> int | str:
    """``--step``'s value: a step number or ``best`` (argparse type)."""
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'best', got {text!r}") from None


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    """The model to code with: ``--workdir`` (a training run: FaSDiff, with the sampler spec
    overrides ``--steps/--t_start/--eta/--seed``, or the mbt2018-mean baseline trained by
    ``configs/mbt2018_mean.py``) or ``--model_dir`` (a converted mbt2018-mean folder)."""
    ap.add_argument("--config", default=None,
                    help="a config file with get_config() (default: the config the workdir "
                         "was trained with, its config.json)")
    ap.add_argument("--workdir", default=None, help="a training workdir (checkpoints)")
    ap.add_argument("--step", type=checkpoint_step, default=None,
                    help="which of the workdir's checkpoints: a step, or 'best' (the best "
                         "held-out evaluation's, config.eval.best_metric; default: the latest)")
    ap.add_argument("--weights", choices=("auto", "ema", "params"), default=None,
                    help="which trained weights of the checkpoint: 'ema' (their moving average, "
                         "config.train.ema_decay > 0), 'params' (the last update's); default "
                         "auto: the moving average where the run kept one")
    ap.add_argument("--model_dir", default=None,
                    help="instead of --workdir: an mbt2018-mean hyperprior folder "
                         "(python -m fasdiff_jax.convert --compressai_checkpoint ... --out DIR)")
    ap.add_argument("--sd_checkpoint", default=None, metavar="DIR",
                    help="where the run's converted SD weights are on this machine (default: "
                         "the config's model.sd_checkpoint); checked by content")
    for name, kind in SAMPLER_FLAGS:
        ap.add_argument(f"--{name}", type=kind, default=None,
                        help=f"FaSDiff's sampler: {SAMPLER_HELP[name]} (default: the config's "
                             f"model.sampler.{name}); compress writes it into each file, "
                             f"decompress reads it from there")


@dataclass(frozen=True)
class LoadedCodec:
    """A model ready to code images, as the codec and evaluate commands use it."""

    name: str
    settings: dict  # what identifies the model and its coding settings (evaluate's JSON)
    compress: Callable[[np.ndarray], bytes]
    decompress: Callable[[bytes], np.ndarray]
    source_options: dict = field(default_factory=dict)  # open_source's cache_dir / image_size
    # several files in one device call where the model can (FaSDiff's sampler); else one by one
    decompress_batch: Callable[[Sequence[bytes]], list] | None = None
    # several images of one size through the analysis transforms in one device call
    compress_batch: Callable[[Sequence[np.ndarray]], list] | None = None

    def compress_many(self, images: Sequence[np.ndarray]) -> list[bytes | Exception]:
        """Each image's file, or in its place the error that image raised."""
        if self.compress_batch is not None:
            return self.compress_batch(images)
        out: list[bytes | Exception] = []
        for image in images:
            try:
                out.append(self.compress(image))
            except (FasdiffError, TypeError, ValueError) as e:
                out.append(e)
        return out

    def decompress_many(self, datas: Sequence[bytes]) -> list[np.ndarray | Exception]:
        """Each file's image, or in its place the error that file raised (a bad file does
        not stop the others)."""
        if self.decompress_batch is not None:
            return self.decompress_batch(datas)
        out: list[np.ndarray | Exception] = []
        for data in datas:
            try:
                out.append(self.decompress(data))
            except (FasdiffError, ValueError) as e:
                out.append(e)
        return out


def load_codec(args: argparse.Namespace) -> LoadedCodec:
    """The model :func:`add_model_flags` names; a bad combination or sampler override fails
    here, once, before any image is read. Without ``--config`` the workdir's own
    ``config.json`` (written by the training run, overrides included) is used."""
    from fasdiff_jax.models import hyperprior as H

    overrides = {name: getattr(args, name) for name, _ in SAMPLER_FLAGS}
    fasdiff_given = given_flags(args, FASDIFF_FLAGS)

    def no_sampler(where: str) -> None:
        if fasdiff_given:
            raise FasdiffError(f"{fasdiff_given}: sampler and SD settings apply to FaSDiff "
                               f"models, not to the hyperprior {where}")

    if args.model_dir is not None:
        if given_flags(args, ("config", "workdir", "step", "weights")):
            raise FasdiffError("give --model_dir, or --workdir (and --config, --step, "
                               "--weights), not both")
        no_sampler("in --model_dir")
        model, params = H.load_model(args.model_dir)
        return _hyperprior_codec("mbt2018-mean", model, params,
                                 {"model_dir": os.path.abspath(args.model_dir)})
    if args.workdir is None:
        raise FasdiffError("give --workdir (a FaSDiff training workdir), or --model_dir (the "
                           "mbt2018-mean baseline)")
    from fasdiff_jax import train

    workdir = train._workdir(args.workdir)
    if args.config is None:
        config, config_path = train.load_run_config(workdir), f"{workdir}/{train.RUN_CONFIG}"
    else:
        config, config_path = load_config(args.config), os.path.abspath(args.config)
    config = _with_sd_checkpoint(config, args.sd_checkpoint)
    try:
        model, params, step, weights = train.restore_for_inference(config, workdir, args.step,
                                                                    args.weights)
    except train.TrainConfigError as e:
        from etils import epath

        if args.config is None:
            raise train.TrainConfigError(f"{e} (the run's config: {config_path})") from e
        if not (epath.Path(workdir) / train.RUN_CONFIG).exists():
            raise
        raise train.TrainConfigError(f"{e} (--config={args.config}; without --config the "
                                     f"config the workdir was trained with is used)") from e
    settings = {"config": config_path, "workdir": workdir, "checkpoint_step": step,
                "weights": weights}
    source_options = {"cache_dir": (config.get("data") or {}).get("cache_dir"),
                      "image_size": config.model.image_size}
    if isinstance(model, H.TrainableHyperprior):  # the baseline trained by our loop
        no_sampler(f"trained in {args.workdir}")
        return _hyperprior_codec(f"mbt2018-mean@{step}", model.model, params[model.KEY],
                                 settings, source_options)
    spec = dataclasses.asdict(model.sampler_spec(**overrides))
    settings.update(sampler=spec, fingerprint=model.fingerprint(params).hex())
    return LoadedCodec(f"fasdiff@{step}", settings, lambda im: model.compress(params, im, **spec),
                       lambda data: model.decompress(params, data), source_options,
                       lambda datas: model.decompress_batch(params, datas),
                       lambda images: model.compress_batch(params, images, **spec))


def _with_sd_checkpoint(config: Any, flag: str | None) -> Any:
    """``config`` with ``--sd_checkpoint`` (a copy), or a readable error where the SD folder
    it names is not on this machine (runs trained elsewhere)."""
    if flag is not None:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.sd_checkpoint = os.path.abspath(flag)
    ckpt = config.model.get("sd_checkpoint") or ""
    if config.model.get("kind", "fasdiff") == "fasdiff" and ckpt and not os.path.isdir(ckpt):
        raise FasdiffError(f"model.sd_checkpoint {ckpt!r} is not a folder on this machine: "
                           f"name the run's converted SD weights with --sd_checkpoint=DIR")
    return config


def _hyperprior_codec(name: str, model: Any, params: dict, settings: dict,
                      source_options: dict | None = None) -> LoadedCodec:
    """A mean-scale hyperprior (``hyperprior.MeanScaleHyperprior`` and its params) as a codec."""
    from fasdiff_jax.models import hyperprior as H

    settings = {**settings, "model": H.model_config(model),
                "fingerprint": H.prepare(model, params).fingerprint.hex()}
    return LoadedCodec(name, settings, lambda im: H.compress(model, params, im),
                       lambda data: H.decompress(model, params, data), source_options or {},
                       compress_batch=lambda images: H.compress_batch(model, params, images))


def batch_jobs(command: str, inputs: list[str], out_dir: str) -> list[tuple[str, str]]:
    """``[(input file, output file)]`` for ``--out_dir``; refuses (before any work) inputs
    that are missing, yield nothing, or would write the same output twice."""
    from fasdiff_jax.data.sources import list_images

    suffix, jobs = SUFFIX[command], []
    for path in inputs:
        if os.path.isdir(path):
            found = (list_images(path, exclude=[out_dir]) if command == "compress"
                     else _fsd_files(path, exclude=[out_dir]))  # outputs are not inputs
            if not found:
                raise FasdiffError(f"{path}: no {'image' if command == 'compress' else '.fsd'} files")
            jobs += [(os.path.join(path, rel), os.path.splitext(rel)[0] + suffix) for rel in found]
        elif os.path.isfile(path):
            jobs.append((path, os.path.splitext(os.path.basename(path))[0] + suffix))
        else:
            raise FasdiffError(f"{path}: no such file or folder")
    seen: dict[str, str] = {}
    for src, rel in jobs:
        if rel in seen:
            raise FasdiffError(f"{seen[rel]} and {src} would both be written to "
                               f"{os.path.join(out_dir, rel)}")
        seen[rel] = src
    return [_not_onto_itself(src, os.path.join(out_dir, rel)) for src, rel in jobs]


def _fsd_files(folder: str, exclude: Sequence[str] = ()) -> list[str]:
    from fasdiff_jax.data.sources import list_images

    return [f for f in list_images(folder, all_files=True, exclude=exclude)
            if f.lower().endswith(".fsd")]


def read_fsd(path: str) -> bytes:
    """A file's bytes; a FIFO, device or folder is refused (reading a FIFO waited forever)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise FasdiffError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        return f.read()


def _not_onto_itself(src: str, dst: str) -> tuple[str, str]:
    if os.path.realpath(src) == os.path.realpath(dst):
        raise FasdiffError(f"{src}: the output would overwrite the input")
    return src, dst


# Output formats and how they are written: all but JPEG hold the decoded 8-bit pixels
# exactly (WebP written lossless; Pillow's default is lossy at quality 80). JPEG is written
# at quality 95 with full-resolution chroma and reported as lossy. Other extensions Pillow
# knows are refused: they quantise (GIF: 256 colours), resize (ICO) or recompress (PDF).
IMAGE_FORMATS: dict[str, dict[str, Any]] = {
    "PNG": {}, "TIFF": {}, "BMP": {}, "PPM": {}, "WEBP": {"lossless": True, "quality": 100},
    "JPEG": {"quality": 95, "subsampling": 0},
}
LOSSY_FORMATS = ("JPEG",)


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def _image_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt not in IMAGE_FORMATS:
        what = "unknown image extension" if fmt is None else f"{fmt} cannot hold the decoded pixels:"
        raise FasdiffError(f"{path}: {what} {ext!r} (use .png, .webp (lossless), .tif, .bmp, "
                           f".ppm/.pgm, or .jpg (lossy, quality 95))")
    return fmt


class _StdoutFailed(Exception):
    """stdout could not be written: the reader left (``| head``) or its disk is full. No
    input is at fault, and every later line would fail too, so the command stops."""


def _say(line: str) -> None:
    """Print ``line`` to stdout now (flushed, so a failure shows at this line, not at exit)."""
    try:
        print(line, flush=True)
    except OSError as e:
        raise _StdoutFailed(str(e)) from e


def _stdout_failed(e: _StdoutFailed) -> int:
    """The exit status after stdout failed. A broken pipe is the reader's choice (``| head``):
    no message and the status of a command killed by SIGPIPE, as cat or grep give (the shell
    shows 141; ``set -o pipefail`` still sees it). Other failures: ``error: stdout: ...``, 2."""
    cause = e.__cause__
    _discard_stdout()
    if isinstance(cause, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e)
    print(f"error: stdout: {why}", file=sys.stderr)
    return 2


def _discard_stdout() -> None:
    """Point stdout's descriptor at the null device: what is still buffered then goes nowhere
    at exit, instead of failing again with an "Exception ignored" traceback (Python's
    documented recipe for SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file descriptor (a test's capture): nothing is flushed to one at exit
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _info(paths: list[str]) -> int:
    """One JSON line per ``.fsd`` file (folders searched recursively): its header, no model.
    A file that cannot be read is reported and skipped; stdout failing stops at once."""
    import json

    from fasdiff_jax.coding.container import describe

    failed = 0
    try:
        for path in paths:
            files = ([os.path.join(path, f) for f in _fsd_files(path)] if os.path.isdir(path)
                     else [path])
            if not files:
                failed += 1
                print(f"error: {path}: no .fsd files", file=sys.stderr)
            for f in files:
                try:
                    line = json.dumps({"file": f, **describe(read_fsd(f))})
                except (FasdiffError, OSError) as e:
                    failed += 1
                    print(f"error: {f}: {e}", file=sys.stderr)
                    continue
                _say(line)
    except _StdoutFailed as e:
        return _stdout_failed(e)
    return 2 if failed else 0


def check_outputs_writable(jobs: Sequence[tuple[str, str]]) -> None:
    """Refuse outputs that cannot be written (read-only place, a file where a folder should
    be, a name ending in a separator) before the model loads: the first write comes only
    after a file is coded (FaSDiff: a whole sampler run). One check per output folder
    (a missing one is probed, then made by the first write); temporary files a killed run
    left for these outputs removed."""
    folders: dict[str, set[str]] = {}
    for _, dst in jobs:
        if dst.endswith(os.sep) or (os.altsep is not None and dst.endswith(os.altsep)):
            raise FasdiffError(f"{dst}: ends in a separator, not a file name")
        folder = os.path.dirname(os.path.abspath(dst))
        if folder not in folders:
            check_writable(dst, flag="")
        folders.setdefault(folder, set()).add(os.path.basename(dst))
    for folder, names in folders.items():  # what a killed run (kill -9) left half-written
        remove_stale_temps(folder, names)


def write_error(dst: str, e: OSError) -> str:
    """``dst: cannot write (cause)``: the output at fault and why (not the input's name, nor
    the temporary file's, nor a bare "File exists" for a parent that is a file)."""
    cause = e.strerror or str(e)
    where = e.filename if isinstance(e.filename, str) else None
    if where and e.errno in (errno.EEXIST, errno.ENOTDIR) and os.path.isfile(where):
        cause = f"{where} is a file, not a folder"
    elif where and not where.startswith(dst):  # dst itself or its temporary name: said
        cause = f"{cause}: {where}"
    return f"{dst}: cannot write ({cause})"


def _export(args: argparse.Namespace) -> int:
    """``export --workdir=RUN [--step=N|best] [--weights=ema|params] OUT``: one checkpoint of
    a training run as a folder for coding (its config and one set of trained params, no
    optimizer state)."""
    from fasdiff_jax import train

    extra = given_flags(args, [f for f in MODEL_FLAGS if f not in ("workdir", "step", "weights")])
    try:
        if args.workdir is None or len(args.paths) != 1 or extra or args.out_dir is not None:
            raise FasdiffError("export takes --workdir (a training run), optionally --step "
                               "and --weights, and one output folder"
                               f"{f'; not {extra}' if extra else ''}")
        step, weights = train.export_for_coding(args.workdir, args.paths[0], args.step,
                                                args.weights)
    except (FasdiffError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in Path(args.paths[0]).rglob("*") if f.is_file())
    print(f"{args.paths[0]}: checkpoint {step} of {args.workdir} for coding, its {weights!r} "
          f"weights ({size / 2**20:.1f} MiB; use it as --workdir)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fasdiff_jax.codec",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("compress", "decompress", "info", "export"))
    ap.add_argument("paths", nargs="+", metavar="path",
                    help="compress/decompress: INPUT OUTPUT, or with --out_dir inputs (files "
                         "or folders); info: .fsd files or folders; export: the output folder")
    ap.add_argument("--out_dir", default=None, help="write every input's output here")
    ap.add_argument("--skip_existing", action="store_true",
                    help="with --out_dir: leave inputs whose output exists (resume a run)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace outputs that exist (refused without it: decompressing into "
                         "the input folder replaced the original images)")
    ap.add_argument("--batch_size", type=int, default=8,
                    help="files coded together: images of one size through the analysis "
                         "transforms in one device call; FaSDiff files of one size and sampler "
                         "in one sampler run")
    add_model_flags(ap)
    compile_cache.add_flag(ap)
    args = ap.parse_args(argv)
    if args.command == "info":
        return _info(args.paths)
    if args.command == "export":
        return _export(args)
    if args.out_dir is None and len(args.paths) != 2:
        ap.error("give INPUT OUTPUT, or inputs and --out_dir")
    if args.skip_existing and args.out_dir is None:
        ap.error("--skip_existing needs --out_dir")
    if args.batch_size < 1:
        ap.error("--batch_size must be >= 1")
    if args.overwrite and args.skip_existing:
        ap.error("--overwrite and --skip_existing exclude each other")
    interrupted = _CtrlC()
    with interrupted:
        return _code(args, interrupted)


class _CtrlC:
    """Ctrl-C as KeyboardInterrupt, remembered: one that lands in a callback (JAX's gc
    callback while it starts) was swallowed there ("Exception ignored") and the run went on
    to exit 0; :meth:`check` raises it at the next safe point."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _code(args: argparse.Namespace, interrupted: _CtrlC) -> int:
    """compress / decompress: the jobs, the model, then the files in batches."""
    notes: dict[str, str] = {}  # output path -> what its line should add

    def read_still(src: str, dst: str) -> np.ndarray:
        from fasdiff_jax.models import hyperprior as H  # loaded with the model

        # gray files come back gray; one too large to code is refused before it is decoded.
        with warnings.catch_warnings(record=True) as caught:  # said as the file's
            warnings.simplefilter("always")
            image = read_image(src, keep_gray=True, max_pixels=H.MAX_PIXELS)
            frames = frame_count(src)
        for line in warning_lines(caught, src):
            print(line, file=sys.stderr)
        if frames > 1:
            notes[dst] = f" (the first of {src}'s {frames} frames: the codec codes still images)"
        return image

    def write_file(dst: str, data: bytes) -> str:
        write_atomically(dst, data)
        return f"{dst}: {len(data)} bytes{notes.pop(dst, '')}"

    def write_image(dst: str, img: np.ndarray) -> str:
        fmt = _image_format(dst)
        if img.shape[-1] == 4 and fmt in ("JPEG", "PPM"):  # no alpha there; ours is opaque
            img = img[..., :3]
        pil = Image.fromarray(np.squeeze(img, -1) if img.shape[-1] == 1 else img)
        write_atomically(dst, lambda tmp: pil.save(tmp, format=fmt, **IMAGE_FORMATS[fmt]))
        lossy = (f" ({fmt} quality {IMAGE_FORMATS[fmt]['quality']}: lossy, not the decoded "
                 f"pixels; .png keeps them)" if fmt in LOSSY_FORMATS else "")
        return f"{dst}: {img.shape[1]}x{img.shape[0]}{lossy}"

    try:
        compile_cache.enable(args.compile_cache)  # (imports JAX: Ctrl-C may come here)
        from fasdiff_jax.data.sources import frame_count, read_image, warning_lines

        jobs = ([_not_onto_itself(*args.paths)] if args.out_dir is None
                else batch_jobs(args.command, args.paths, args.out_dir))
        if args.skip_existing:  # a folder in an output's place is not a finished output
            jobs = [(s, d) for s, d in jobs if not os.path.isfile(d)]
        if not jobs:
            print("nothing to do: every output exists")
            return 0
        there = [d for _, d in jobs if os.path.lexists(d)]
        if there and not args.overwrite:
            keep = ", or --skip_existing to keep them" if args.out_dir is not None else ""
            raise FasdiffError(f"{len(there)} of the outputs exist ({listed(there, ', ')}): "
                               f"pass --overwrite to replace them{keep}")
        if args.command == "decompress":  # before loading a model
            sampler = given_flags(args, [name for name, _ in SAMPLER_FLAGS])
            if sampler:  # ignored without a word before (a script may pass both the same flags)
                print(f"warning: {sampler}: decompress decodes with the sampler each file was "
                      f"compressed with (its header); these set compress's and are ignored here",
                      file=sys.stderr)
                for name, _ in SAMPLER_FLAGS:  # ignored: not refused either (a baseline's)
                    setattr(args, name, None)
            for _, dst in jobs:
                _image_format(dst)
        check_outputs_writable(jobs)
        codec = load_codec(args)
        interrupted.check()
    except (FasdiffError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads: nothing written yet
        print("interrupted before any file was coded", file=sys.stderr)
        return 130
    failed = 0

    def report(src: str, e: Exception) -> None:
        nonlocal failed
        failed += 1
        print(f"error: {e}" if src in str(e) else f"error: {src}: {e}", file=sys.stderr)

    if args.command == "compress":
        read, code, write = read_still, codec.compress_many, write_file
    else:
        read, code, write = (lambda src, dst: read_fsd(src)), codec.decompress_many, write_image

    def code_or_split(inputs: list) -> list:
        """``code(inputs)``; where the batch runs out of memory, its inputs one at a time,
        and an input that does not fit alone gets an :class:`OutOfMemoryError` in its place."""
        try:
            return code(inputs)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            if len(inputs) > 1:
                return [r for x in inputs for r in code_or_split([x])]
            size = (f" ({inputs[0].shape[0]}x{inputs[0].shape[1]} pixels)"
                    if isinstance(inputs[0], np.ndarray) else "")
            return [OutOfMemoryError(f"out of memory coding it{size} on {_device_kind()}")]

    written = 0
    try:
        for start in range(0, len(jobs), args.batch_size):
            interrupted.check()
            read_ok, inputs = [], []
            for src, dst in jobs[start:start + args.batch_size]:
                try:
                    inputs.append(read(src, dst))
                    read_ok.append((src, dst))
                except (FasdiffError, OSError, ValueError) as e:
                    report(src, e)
            for (src, dst), result in zip(read_ok, code_or_split(inputs) if inputs else []):
                if isinstance(result, Exception):
                    report(src, result)
                    continue
                try:
                    line = write(dst, result)
                except OSError as e:
                    failed += 1
                    print(f"error: {write_error(dst, e)}", file=sys.stderr)
                    if is_out_of_space(e) or e.errno == errno.EROFS:  # so would every later one
                        resume = (f"; rerun with --skip_existing to resume"
                                  if args.out_dir is not None else "")
                        print(f"stopped: {written} of {len(jobs)} files written (they stay)"
                              f"{resume}", file=sys.stderr)
                        return 2
                    continue
                except (FasdiffError, ValueError) as e:
                    report(src, e)
                    continue
                written += 1
                _say(line)
        interrupted.check()
        if len(jobs) > 1:
            _say(f"{args.command}ed {len(jobs) - failed} of {len(jobs)} files"
                 + (f", {failed} failed" if failed else ""))
    except _StdoutFailed as e:
        return _stdout_failed(e)
    except KeyboardInterrupt:  # Ctrl-C: what is written stays whole (written atomically)
        resume = "; rerun with --skip_existing to go on" if args.out_dir is not None else ""
        print(f"interrupted: {written} of {len(jobs)} files written (they stay){resume}",
              file=sys.stderr)
        return 130
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
