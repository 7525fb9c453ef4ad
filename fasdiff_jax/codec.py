"""Compress and decompress image files with a trained FaSDiff model.

    python -m fasdiff_jax.codec compress   --config=configs/tiny.py --workdir=DIR face.png face.fsd
    python -m fasdiff_jax.codec decompress --config=configs/tiny.py --workdir=DIR face.fsd out.png

The model is the config's (frozen SD parts from ``model.sd_checkpoint`` or the config's seed)
with the trained parts from the latest checkpoint in ``--workdir``. ``compress`` takes any
image Pillow reads (odd modes and EXIF rotation handled); ``decompress`` writes a PNG of the
original size. ``--steps/--t_start/--eta/--seed`` override the config's sampler spec, which
is stored in the file. Errors (unreadable image, malformed file, other model's file, missing
checkpoint) exit with status 2 and one readable line.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import numpy as np
from PIL import Image

from fasdiff_jax.errors import FasdiffError


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("fasdiff_codec_config", path)
    if spec is None or spec.loader is None:
        raise FasdiffError(f"{path}: not a Python config file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("compress", "decompress"))
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    for name, kind in (("steps", int), ("t_start", int), ("eta", float), ("seed", int)):
        ap.add_argument(f"--{name}", type=kind, default=None)
    args = ap.parse_args(argv)

    from fasdiff_jax import train
    from fasdiff_jax.data.sources import read_image

    try:
        model, params, _ = train.restore_for_inference(load_config(args.config), args.workdir)
        if args.command == "compress":
            data = model.compress(params, read_image(args.input), steps=args.steps,
                                  t_start=args.t_start, eta=args.eta, seed=args.seed)
            with open(args.output, "wb") as f:
                f.write(data)
            print(f"{args.output}: {len(data)} bytes")
        else:
            with open(args.input, "rb") as f:
                img = model.decompress(params, f.read())
            Image.fromarray(np.squeeze(img, -1) if img.shape[-1] == 1 else img).save(args.output)
            print(f"{args.output}: {img.shape[1]}x{img.shape[0]}")
    except (FasdiffError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
