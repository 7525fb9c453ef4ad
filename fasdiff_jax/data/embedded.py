"""The embedded default dataset, assembled at first use from photos installed packages ship.

Real photographs only, nothing downloaded: 11 photos, 2 of them with a face. scikit-image's
``astronaut.png`` (Eileen Collins) and matplotlib's ``grace_hopper.jpg`` hold one face each
that dlib detects; dlib finds no face in the other bundled photos, which give natural-image
texture crops (4 random square crops per photo, seeded). Faces are aligned by the same code
as ``prepare``. The split is disjoint by source photograph:

* train (29 records): the astronaut face; 28 texture crops from coffee, chelsea,
  motorcycle_left, rocket, brick, grass, gravel;
* heldout (9 records): the Grace Hopper face; 8 texture crops from camera (the
  cameraman, face too small for dlib) and hubble_deep_field.

Records carry ``kind`` ("face" / "texture") and ``key`` (package/photo). That is enough for
smoke tests and a demo of the pipeline, not for training a useful model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time

import numpy as np

from fasdiff_jax.errors import DataError

VERSION = 2  # part of the cache folder name: bump when the contents change
FACE_PHOTOS = {"train": [("skimage", "astronaut.png")],
               "heldout": [("matplotlib", "grace_hopper.jpg")]}
TEXTURE_PHOTOS = {
    "train": [("skimage", n) for n in ("coffee.png", "chelsea.png", "motorcycle_left.png",
                                      "rocket.jpg", "brick.png", "grass.png",
                                      "gravel.png")],
    "heldout": [("skimage", "camera.png"), ("skimage", "hubble_deep_field.jpg")],
}
CROPS_PER_TEXTURE_PHOTO = 4


_PHOTO_DIRS = {"skimage": ("data",), "matplotlib": ("mpl-data", "sample_data")}


def photo_path(package: str, name: str) -> str:
    """Path of a photo bundled inside an installed package (never fetched from the network).

    Found with ``importlib`` without importing the package (both are slow to import).
    """
    import importlib.util

    if package not in _PHOTO_DIRS:
        raise DataError(f"unknown photo package {package!r}; expected one of {sorted(_PHOTO_DIRS)}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = {"skimage": "scikit-image"}.get(package, package)
        raise DataError(f"the embedded default needs {pip_name} installed (its bundled photos): "
                        f"pip install {pip_name}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *_PHOTO_DIRS[package], name)
    if not os.path.isfile(path):
        raise DataError(f"bundled photo missing from the installed {package}: {path}")
    return path


def default_cache_dir() -> str:
    from fasdiff_jax import cache_home

    return cache_home()


def _texture_crops(image: np.ndarray, size: int, count: int, seed: int) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    out = []
    for _ in range(count):
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(image[y : y + side, x : x + side])
        out.append(np.asarray(crop.resize((size, size), Image.LANCZOS)))
    return out


def _build_split(split: str, out_dir: str, size: int) -> None:
    import json

    from array_record.python.array_record_module import ArrayRecordWriter

    from fasdiff_jax.data.prepare import PrepareOptions, process_photo
    from fasdiff_jax.data.sources import MANIFEST, encode_record, read_image

    os.makedirs(out_dir)
    writer = ArrayRecordWriter(os.path.join(out_dir, "part-000000.array_record"), "group_size:1")
    opts = PrepareOptions(size=size, min_face_size=48)
    n_faces = n_tex = 0
    skipped = []
    try:
        for package, name in FACE_PHOTOS[split]:
            os.utime(os.path.dirname(out_dir))  # alive: not an abandoned build (see below)
            photo = read_image(photo_path(package, name))
            faces, reason = process_photo(photo, opts)
            if reason:
                skipped.append({"key": f"{package}/{name}", "reason": reason})
            for aligned, meta in faces:
                writer.write(encode_record(aligned, {"key": f"{package}/{name}", "kind": "face",
                                                     **meta}))
                n_faces += 1
        for j, (package, name) in enumerate(TEXTURE_PHOTOS[split]):
            photo = read_image(photo_path(package, name))
            crops = _texture_crops(photo, size, CROPS_PER_TEXTURE_PHOTO, seed=1000 * VERSION + j)
            for k, crop in enumerate(crops):
                writer.write(encode_record(crop, {"key": f"{package}/{name}", "kind": "texture",
                                                  "crop": k}))
                n_tex += 1
    except BaseException:
        try:  # let go of the file before the temp folder is removed
            writer.close()
        except RuntimeError:
            pass  # the same write failure again
        raise
    writer.close()
    manifest = {
        "format": "fasdiff-prepared-v1", "source": f"embedded-v{VERSION}:{split}",
        "output_size": size, "num_faces": n_faces, "num_textures": n_tex,
        "face_photos": [f"{p}/{n}" for p, n in FACE_PHOTOS[split]],
        "texture_photos": [f"{p}/{n}" for p, n in TEXTURE_PHOTOS[split]],
        "skipped": skipped, "num_skipped": len(skipped),
        "shards": [{"file": "part-000000.array_record", "num_records": n_faces + n_tex}],
        "complete": True,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


BUILD_PREFIX = ".embedded-build-"
ABANDONED_BUILD_S = 600.0  # a build takes ~20 s on a 2-core CPU; one untouched this long died


def _remove_abandoned_builds(cache_dir: str) -> None:
    """Remove build folders a killed first use left (``kill -9`` skips the cleanup below):
    each kill left another. Age, not process id, tells them apart: the cache folder may be
    shared by machines (a home folder on NFS)."""
    now = time.time()
    for entry in os.listdir(cache_dir):
        path = os.path.join(cache_dir, entry)
        try:
            if entry.startswith(BUILD_PREFIX) and now - os.path.getmtime(path) > ABANDONED_BUILD_S:
                shutil.rmtree(path)
        except OSError:
            pass  # removed by another process, or not ours to remove


def embedded_dataset(cache_dir: str | None = None, size: int = 256) -> dict[str, str]:
    """Build (once) and return ``{"train": dir, "heldout": dir}`` prepared folders.

    Built in a temporary folder and renamed into place, so concurrent first uses are safe;
    a failed build (disk full, read-only cache) is a DataError and leaves nothing behind.
    """
    root = os.path.join(cache_dir or default_cache_dir(), f"embedded-v{VERSION}-{size}")
    dirs = {s: os.path.join(root, s) for s in ("train", "heldout")}
    if all(os.path.isfile(os.path.join(d, "manifest.json")) for d in dirs.values()):
        return dirs
    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_abandoned_builds(parent)
        tmp = tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=parent)
    except OSError as e:
        raise _cache_error(parent, size, e) from e
    try:
        for s in dirs:
            # Photos come from installed packages (DataError when one is missing); an OSError
            # or ArrayRecord's RuntimeError here is a write failing: disk full, read-only.
            _build_split(s, os.path.join(tmp, s), size)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            if not os.path.isdir(root):
                raise
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not re.search(r"\b(write|open|close)\(\) failed",
                                                         str(e)):
            raise  # not ArrayRecord's failed write: a bug to see, not a cache folder to change
        raise _cache_error(parent, size, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs


def _cache_error(cache_dir: str, size: int, e: BaseException) -> DataError:
    """A failed build as one line that says where, why, and what to do: ArrayRecord reports
    a full disk as ``RuntimeError: write() failed: ...`` naming a temp file."""
    from fasdiff_jax.files import is_out_of_space, write_failure

    # An upper bound: every record as raw pixels, plus 2 MiB for block padding, manifests.
    records = sum(len(FACE_PHOTOS[s]) + CROPS_PER_TEXTURE_PHOTO * len(TEXTURE_PHOTOS[s])
                  for s in FACE_PHOTOS)
    mb = -(-(records * size * size * 3 + (2 << 20)) // (1 << 20))
    where = "a folder" if is_out_of_space(e) else "a writable folder"
    return DataError(f"cannot build the embedded dataset in {cache_dir}: {write_failure(e) or e} "
                     f"(set FASDIFF_CACHE to {where} with {mb} MB free)")
