"""Compress and decompress image files with a trained FaSDiff model.

    python -m fasdiff_jax.codec compress   --config=configs/tiny.py --workdir=DIR face.png face.fsd
    python -m fasdiff_jax.codec decompress --config=configs/tiny.py --workdir=DIR face.fsd out.png
    # many files, one model load and one compile per image size:
    python -m fasdiff_jax.codec compress   --config=... --workdir=DIR a.png photos/ --out_dir=fsd/
    python -m fasdiff_jax.codec decompress --config=... --workdir=DIR fsd/ --out_dir=png/

The model is the config's (frozen SD parts from ``model.sd_checkpoint`` or the config's seed)
with the trained parts from the latest checkpoint in ``--workdir``. ``compress`` takes any
image Pillow reads (odd modes and EXIF rotation handled); ``decompress`` writes an image of
the original size (PNG, or the format the output name's extension names).
``--steps/--t_start/--eta/--seed`` override the config's sampler spec, which is stored in
the file.

With ``--out_dir`` every input (a file, or a folder searched recursively for images, or for
``.fsd`` files when decompressing) is written to ``out_dir`` under its own name (for folders,
its path relative to the folder) with the suffix ``.fsd`` or ``.png``. A file that fails is
reported and skipped; the others still run. Outputs appear whole or not at all (written to a
temporary name, then renamed), so ``--skip_existing`` resumes an interrupted run.

Errors (unreadable image, malformed file, other model's file, missing checkpoint) are one
readable line each; the exit status is 2 when any file failed, else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable

import numpy as np
from PIL import Image

from fasdiff_jax.errors import FasdiffError

SUFFIX = {"compress": ".fsd", "decompress": ".png"}


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("fasdiff_codec_config", path)
    if spec is None or spec.loader is None:
        raise FasdiffError(f"{path}: not a Python config file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def add_sampler_flags(ap: argparse.ArgumentParser) -> None:
    """``--steps/--t_start/--eta/--seed``: overrides of the config's sampler spec."""
    for name, kind in (("steps", int), ("t_start", int), ("eta", float), ("seed", int)):
        ap.add_argument(f"--{name}", type=kind, default=None, help="sampler spec override")


def batch_jobs(command: str, inputs: list[str], out_dir: str) -> list[tuple[str, str]]:
    """``[(input file, output file)]`` for ``--out_dir``; refuses (before any work) inputs
    that are missing, yield nothing, or would write the same output twice."""
    from fasdiff_jax.data.sources import list_images

    suffix, jobs = SUFFIX[command], []
    for path in inputs:
        if os.path.isdir(path):
            found = (list_images(path) if command == "compress" else
                     [f for f in list_images(path, all_files=True) if f.lower().endswith(".fsd")])
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


def _not_onto_itself(src: str, dst: str) -> tuple[str, str]:
    if os.path.realpath(src) == os.path.realpath(dst):
        raise FasdiffError(f"{src}: the output would overwrite the input")
    return src, dst


def write_atomically(path: str, content: bytes | Callable[[str], None]) -> None:
    """Write ``content`` (bytes, or ``content(tmp_path)`` writes the file) to a temporary name,
    then rename it to ``path``: an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _image_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise FasdiffError(f"{path}: unknown image extension {ext!r} (use .png)")
    return fmt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("compress", "decompress"))
    ap.add_argument("paths", nargs="+", metavar="path",
                    help="INPUT OUTPUT, or with --out_dir: inputs (files or folders)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out_dir", default=None, help="write every input's output here")
    ap.add_argument("--skip_existing", action="store_true",
                    help="with --out_dir: leave inputs whose output exists (resume a run)")
    add_sampler_flags(ap)
    args = ap.parse_args(argv)
    if args.out_dir is None and len(args.paths) != 2:
        ap.error("give INPUT OUTPUT, or inputs and --out_dir")
    if args.skip_existing and args.out_dir is None:
        ap.error("--skip_existing needs --out_dir")

    from fasdiff_jax import train
    from fasdiff_jax.data.sources import read_image

    def compress(src: str, dst: str) -> str:
        data = model.compress(params, read_image(src), steps=args.steps, t_start=args.t_start,
                              eta=args.eta, seed=args.seed)
        write_atomically(dst, data)
        return f"{dst}: {len(data)} bytes"

    def decompress(src: str, dst: str) -> str:
        fmt = _image_format(dst)
        with open(src, "rb") as f:
            img = model.decompress(params, f.read())
        pil = Image.fromarray(np.squeeze(img, -1) if img.shape[-1] == 1 else img)
        write_atomically(dst, lambda tmp: pil.save(tmp, format=fmt))
        return f"{dst}: {img.shape[1]}x{img.shape[0]}"

    run = compress if args.command == "compress" else decompress
    try:
        jobs = ([_not_onto_itself(*args.paths)] if args.out_dir is None
                else batch_jobs(args.command, args.paths, args.out_dir))
        if args.skip_existing:
            jobs = [(s, d) for s, d in jobs if not os.path.exists(d)]
        if not jobs:
            print("nothing to do: every output exists")
            return 0
        model, params, _ = train.restore_for_inference(load_config(args.config), args.workdir)
        if args.command == "compress":  # a bad override fails once, not once per file
            model.sampler_spec(args.steps, args.t_start, args.eta, args.seed)
    except (FasdiffError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for src, dst in jobs:
        try:
            print(run(src, dst))
        except (FasdiffError, OSError, ValueError) as e:
            failed += 1
            print(f"error: {e}" if src in str(e) else f"error: {src}: {e}", file=sys.stderr)
    if len(jobs) > 1:
        print(f"{args.command}ed {len(jobs) - failed} of {len(jobs)} files"
              + (f", {failed} failed" if failed else ""))
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
