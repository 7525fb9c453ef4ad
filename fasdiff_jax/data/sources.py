"""Random-access data sources whose items are dicts with ``image``: uint8 (H, W, 3).

All sources are picklable (Grain worker processes re-open them) and index with ints:

* :func:`open_prepared` -- ArrayRecord shards written by :mod:`fasdiff_jax.data.prepare`;
* :class:`FolderSource` -- a (recursive) folder of image files, decoded at read time;
* :class:`TfdsSource` -- a TFDS dataset (``celeb_a``, ``celeb_a_hq``...) through
  ``tfds.data_source`` (ArrayRecord random access; no TF graph in the training loop);
* ``embedded`` -- the default built from photos shipped by installed packages
  (:mod:`fasdiff_jax.data.embedded`).

:func:`open_source` turns a spec string (``"tfds:celeb_a_hq/256:train"``,
``"prepared:DIR"``, ``"folder:DIR"``, ``"embedded:train"``, or a bare folder) into one.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import itertools
import json
import os
import struct
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fasdiff_jax.errors import DataError, OutOfMemoryError, listed


RECORD_MAGIC = b"FSD1"
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
)


def encode_record(image: np.ndarray, meta: dict[str, Any]) -> bytes:
    """One prepared record: magic, JSON header length, JSON metadata, PNG image (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    header = json.dumps(meta, separators=(",", ":")).encode()
    return RECORD_MAGIC + struct.pack("<I", len(header)) + header + buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_record`: ``{"image": uint8 HWC, **meta}``."""
    meta, n = _record_meta(data)
    with Image.open(io.BytesIO(data[8 + n :])) as im:
        meta["image"] = np.asarray(im.convert("RGB"))
    return meta


def _record_meta(data: bytes) -> tuple[dict[str, Any], int]:
    """A record's metadata (its key, crop box, ...) without decoding its image, and its
    length in bytes."""
    if data[:4] != RECORD_MAGIC:
        raise DataError(f"not a fasdiff record (magic {data[:4]!r}, expected {RECORD_MAGIC!r})")
    (n,) = struct.unpack("<I", data[4:8])
    return json.loads(data[8 : 8 + n]), n


_REPREPARE = "re-run python -m fasdiff_jax.data.prepare, which rewrites it"


@dataclasses.dataclass(frozen=True)
class _Shard:
    """One whole shard, as array_record's ``FileInstruction``: the data source takes the
    count from here instead of re-opening every shard in each Grain worker."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


def _read_manifest(path: str) -> tuple[dict[str, Any], list[str]]:
    """The manifest's JSON object and the files of its shards that hold records; DataError
    naming the manifest and the field when it is not what ``prepare`` writes."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); {_REPREPARE}") from e
    if not isinstance(manifest, dict):
        raise DataError(f"{path} holds a JSON {type(manifest).__name__}, not the object "
                        f"prepare writes; {_REPREPARE}")
    shards = manifest.get("shards", [])
    if not isinstance(shards, list):
        raise DataError(f"{path}: \"shards\" must be a list, got {type(shards).__name__}")
    files = []
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and shard["file"]):
            raise DataError(f"{path}: shards[{i}] has no \"file\" name ({shard!r}); "
                            f"{_REPREPARE}")
        count = shard.get("num_records", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise DataError(f"{path}: shards[{i}].num_records must be a whole number >= 0, "
                            f"got {count!r}")
        if count:
            files.append(shard["file"])
    return manifest, files


def _shard_error(path: str, e: BaseException) -> DataError:
    """array_record's and the decoder's errors name neither the shard nor the fix."""
    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__  # some are blank
    return DataError(f"corrupt or truncated shard {path} ({reason}); delete "
                     f"it and re-run python -m fasdiff_jax.data.prepare with the same options, "
                     f"which redoes missing chunks")


def count_records(path: str) -> int:
    """Records in one shard (reads its footer only); DataError naming it when damaged."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        try:
            return int(reader.num_records())
        finally:
            reader.close()
    except (RuntimeError, OSError, ValueError) as e:
        raise _shard_error(path, e) from e


class PreparedSource:
    """Records of a prepared folder (all ``*.array_record`` shards listed in its manifest).

    Every shard's footer is read when the folder is opened, so a damaged shard stops a
    training run or an evaluation at its start, named; a record damaged inside a shard is
    named with its shard when read."""

    def __init__(self, directory: str | os.PathLike):
        from concurrent.futures import ThreadPoolExecutor

        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(path):
            raise DataError(f"{self.directory} is not a prepared folder: no {MANIFEST}")
        self.manifest, shards = _read_manifest(path)
        if self.manifest.get("complete") is False:  # manifests before the field: complete
            pending = self.manifest.get("pending_chunks")
            which = (f"chunks {listed([str(c) for c in pending], ', ')} of "
                     if isinstance(pending, list) and pending else "")
            raise DataError(f"prepared folder {self.directory} is unfinished: {path} lists "
                            f"{which}its input as still to do (prepare was interrupted, or the "
                            f"--shard_index runs of other machines have not finished); rerun "
                            f"the prepare command, which keeps the finished chunks")
        if not shards:
            raise DataError(f"prepared folder {self.directory} holds no records ({path})")
        self._paths = [os.path.join(self.directory, s) for s in shards]
        for p in self._paths:
            if not os.path.isfile(p):
                raise DataError(f"shard listed in {path} is missing: {p}")
        with ThreadPoolExecutor(min(16, len(self._paths))) as pool:
            self._counts = list(pool.map(count_records, self._paths))
        self._ends = list(itertools.accumulate(self._counts))
        if not self._ends[-1]:
            raise DataError(f"prepared folder {self.directory} holds no records: its shards "
                            f"listed in {path} are empty")
        self._source = None

    def _open(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(
                [_Shard(p, 0, n, n) for p, n in zip(self._paths, self._counts) if n])
        return self._source

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._read(index, decode_record)

    def meta(self, index: int) -> dict[str, Any]:
        """Record ``index``'s metadata (its ``key``...) without decoding its image: listing
        the names of a large set read every image before (~2 ms each at 256 px)."""
        return self._read(index, lambda data: _record_meta(data)[0])

    def _read(self, index: int, decode: Any) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range: {self.directory} holds {len(self)}")
        try:
            return decode(self._open()[index])
        except (RuntimeError,) + _READ_ERRORS as e:
            shard = self._paths[bisect.bisect_right(self._ends, index)]
            raise _shard_error(shard, e) from e

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"PreparedSource({self.directory!r})"


def open_prepared(directory: str | os.PathLike) -> PreparedSource:
    """Random-access source over a folder written by ``python -m fasdiff_jax.data.prepare``."""
    return PreparedSource(directory)


def list_images(directory: str, all_files: bool = False,
                exclude: Sequence[str] = ()) -> list[str]:
    """Relative paths under ``directory`` (recursive, sorted, hidden entries skipped).
    Linked folders are followed (they were left out without a word), each real folder once,
    so a link loop ends; the folders ``exclude`` (prepare's output) are not entered by any
    path."""
    out = []
    seen = {os.path.realpath(directory), *map(os.path.realpath, exclude)}
    for root, dirs, files in os.walk(directory, followlinks=True):
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, d))
            if real not in seen:
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                continue
            if all_files or name.lower().endswith(IMAGE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(out)


def decode_image_file(path: str, keep_gray: bool = False,
                      max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to uint8 RGB HxWx3 (EXIF-rotated, odd modes converted), or with
    ``keep_gray`` a grayscale file to HxWx1.

    ``max_pixels`` (the codec passes its decoders' limit) refuses a larger image from its
    header, before decoding: a small all-zero PNG can ask for gigabytes, and Pillow only
    warns below twice its own ``MAX_IMAGE_PIXELS``. EXIF rotation keeps the pixel count.

    Raises :class:`DataError` whose message is only the reason (``empty file``,
    ``unreadable: ...``, ``truncated image: ...``, ``corrupt image: ...``, ``unsupported
    mode ...``), so ``prepare`` can report it per file in its manifest: whatever Pillow
    raises on a damaged file (its plugins raise TypeError, KeyError, IndexError... too) is
    that file's fault. Running out of memory is not: :class:`OutOfMemoryError`.
    """
    from fasdiff_jax.data.align import to_rgb

    size = None
    try:
        if os.path.getsize(path) == 0:
            raise DataError("empty file")
        with _open_image(path, max_pixels is not None) as im:
            size = im.size
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(_over_limit(im, max_pixels))
            im.load()
            try:
                arr = np.asarray(to_rgb(im, keep_gray))
                return arr[..., None] if arr.ndim == 2 else arr
            except DataError:
                raise
            except (ValueError, OSError) as e:
                raise DataError(f"unsupported mode {im.mode}: {type(e).__name__}: {e}") from e
    except DataError:
        raise
    except MemoryError as e:  # the host's state, not the file's: no "corrupt image"
        pixels = f" ({size[1]}x{size[0]} pixels)" if size else ""
        raise OutOfMemoryError(f"out of memory decoding it{pixels}") from e
    except Exception as e:  # noqa: BLE001 - Pillow raises many types; Ctrl-C still stops
        raise DataError(_reason(e)) from e


def _over_limit(im: Image.Image, max_pixels: int) -> str:
    return (f"image of {im.height}x{im.width} pixels exceeds the decoders' limit of "
            f"{max_pixels} pixels; code it in tiles")


def _open_image(path: str, quiet_bomb: bool) -> Image.Image:
    """``Image.open``; with ``quiet_bomb`` (the caller checks the size itself) without
    Pillow's DecompressionBombWarning, which would add a second, traceback-like line."""
    if not quiet_bomb:
        return Image.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


# What Pillow raises for a record it cannot decode (PreparedSource; files: any Exception).
_READ_ERRORS = (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
                struct.error)


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return f"too many pixels (decompression bomb guard): {e}"
    if isinstance(e, Image.UnidentifiedImageError):
        return "unreadable: not a recognised image format"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"unreadable file: {type(e).__name__}: {e}"
    kind = "truncated" if "truncat" in str(e).lower() else "corrupt"
    return f"{kind} image: {type(e).__name__}: {e}"


def read_image(path: str, keep_gray: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """:func:`decode_image_file` with the path in the error message."""
    try:
        return decode_image_file(path, keep_gray, max_pixels)
    except (DataError, OutOfMemoryError) as e:
        raise type(e)(f"cannot decode image {path}: {e}") from e


def warning_texts(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """Each distinct warning caught, once, on one line."""
    return list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))


def warning_lines(caught: Sequence[warnings.WarningMessage], name: str) -> list[str]:
    """``warning: NAME: text`` once per distinct warning caught while reading ``name``:
    Pillow's own ("Corrupt EXIF data") name its plugin's source line, not the file."""
    return [f"warning: {name}: {text}" for text in warning_texts(caught)]


def frame_count(path: str) -> int:
    """How many frames the image file holds (animated GIF/WebP/PNG, multi-page TIFF); 1 for
    a still image or a file whose frames Pillow cannot count. The decoders read the first
    frame only, so callers tell the user when there are more; counting walks every frame,
    and a damaged later one (Pillow raises TypeError, IndexError, KeyError...) must not fail
    a file whose first frame decoded (:func:`read_image` reports a bad first one)."""
    try:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    except Exception:  # noqa: BLE001 - a note's count: never worth failing the file
        return 1


def header_error(path: str, max_pixels: int | None = None) -> str | None:
    """Why ``path`` is not an image Pillow can open (empty, not an image format, over the
    decompression-bomb limit or ``max_pixels``), from its header alone; None if it opens. A
    file truncated after its header passes here and fails when decoded."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with _open_image(path, max_pixels is not None) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                return _over_limit(im, max_pixels)
            return None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged header makes Pillow raise
        return _reason(e)


class FolderSource:
    """Plain image folder (recursive). Images keep their size; the pipeline crops/resizes.

    Every file's header is read when the folder is opened (threads; ~33 us a file on a local
    disk), so a file that is not an image stops a training run or an evaluation at its start,
    with every such file named, rather than at the step that first reads it, where every
    resume would stop again. ``max_pixels`` (evaluate passes the codec's limit) counts an image
    larger than that as such a file; None leaves only Pillow's decompression-bomb limit."""

    def __init__(self, directory: str | os.PathLike, max_pixels: int | None = None):
        from concurrent.futures import ThreadPoolExecutor
        from functools import partial

        self.directory = os.fspath(directory)
        self.max_pixels = max_pixels
        if not os.path.isdir(self.directory):
            raise DataError(f"image folder does not exist: {self.directory}")
        self.files = list_images(self.directory)
        if not self.files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.directory}")
        with ThreadPoolExecutor(16) as pool:
            errors = list(pool.map(partial(header_error, max_pixels=max_pixels),
                                   (os.path.join(self.directory, f) for f in self.files)))
        bad = [f"{f}: {e}" for f, e in zip(self.files, errors) if e is not None]
        if bad:
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DataError(f"{len(bad)} of {len(self.files)} files under {self.directory} are "
                            f"not images that can be read ({shown}); remove them, or use "
                            f"python -m fasdiff_jax.data.prepare, which skips such files")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel = self.files[int(index)]
        try:
            image = read_image(os.path.join(self.directory, rel), max_pixels=self.max_pixels)
        except DataError as e:  # e.g. truncated after a header the opening check read
            raise DataError(f"{e}; replace or remove the file and rerun the command: training "
                            f"and evaluate resume where they stopped") from e
        return {"image": image, "key": rel}

    def __repr__(self) -> str:
        return f"FolderSource({self.directory!r}, {len(self.files)} files)"


class TfdsSource:
    """A TFDS split through ``tfds.data_source``; yields ``{"image": uint8 HWC}``.

    CelebA / CelebA-HQ need their files downloaded manually into ``data_dir``; TFDS then
    prepares ArrayRecord files that we read with random access.
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image"):
        self.name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
        self._source = None
        n = len(self._open())  # fail early with a readable error
        if n == 0:
            raise DataError(f"TFDS {name}:{split} is empty")

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            try:
                self._source = tfds.data_source(
                    self.name, split=self.split, data_dir=self.data_dir, download=False
                )
            except Exception as e:  # tfds raises many types (AssertionError, DatasetNotFound...)
                # its first line: a name it does not know came with all ~1,300 it does
                reason = (str(e).strip().splitlines() or [""])[0][:300]
                raise DataError(
                    f"cannot open TFDS {self.name}:{self.split} (data_dir={self.data_dir}): "
                    f"{type(e).__name__}: {reason}. tfds.data_source reads ArrayRecord only: "
                    f"build it "
                    f"with `tfds build {self.name} --file_format=array_record "
                    f"--manual_dir=DIR` (CelebA(-HQ) files must be downloaded by hand)."
                ) from e
        return self._source

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._open()[int(index)]
        image = np.asarray(item[self.image_key])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, -1)
        return {"image": np.ascontiguousarray(image[..., :3], dtype=np.uint8),
                "key": f"{self.split}/{int(index)}"}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """``tfds:celeb_a_hq/256:train`` -> (``celeb_a_hq/256``, ``train``); split defaults to train."""
    body = spec[len("tfds:"):]
    name, _, split = body.partition(":")
    if not name:
        raise DataError(f"bad TFDS spec {spec!r}: expected tfds:NAME[:SPLIT]")
    return name, split or "train"


def open_source(spec: str, data_dir: str | None = None, cache_dir: str | None = None,
                image_size: int = 256,
                max_pixels: int | None = None) -> Sequence[dict[str, Any]]:
    """A random-access source from a spec string (see the module docstring); ``max_pixels``
    bounds the images of a folder source (see :class:`FolderSource`)."""
    if spec.startswith("tfds:"):
        name, split = parse_tfds_spec(spec)
        return TfdsSource(name, split, data_dir=data_dir)
    if spec.startswith("prepared:"):
        return open_prepared(spec[len("prepared:"):])
    if spec.startswith("folder:"):
        return FolderSource(spec[len("folder:"):], max_pixels)
    if spec == "embedded" or spec.startswith("embedded:"):
        from fasdiff_jax.data.embedded import FACE_PHOTOS, embedded_dataset

        split = spec.partition(":")[2] or "train"
        if split not in FACE_PHOTOS:  # before building the default, which takes seconds
            raise DataError(f"unknown embedded split {split!r} in {spec!r}: use "
                            f"{' or '.join(f'embedded:{s}' for s in FACE_PHOTOS)}")
        folder = embedded_dataset(cache_dir=cache_dir, size=image_size)[split]
        try:
            return open_prepared(folder)
        except DataError as e:  # a damaged cache: prepare's advice does not rebuild it
            raise DataError(f"the embedded default's cache is damaged: {e}. Delete "
                            f"{os.path.dirname(folder)}; it is rebuilt on next use") from e
    if os.path.isfile(os.path.join(spec, MANIFEST)):
        return open_prepared(spec)
    if os.path.isdir(spec):
        return FolderSource(spec, max_pixels)
    raise DataError(
        f"unknown data source {spec!r}: use tfds:NAME[:SPLIT], prepared:DIR, folder:DIR, "
        f"embedded[:train|heldout], or an existing folder"
    )
