"""Detect, align (FFHQ-style) and pack faces into ArrayRecord shards with a manifest.

    python -m fasdiff_jax.data.prepare --input DIR|tfds:NAME[:SPLIT] --output DIR --size 256 \
        [--num_workers 4] [--shard_index i --num_shards n] [--min_face_size 64]

Work is split into fixed chunks of the (sorted) input list. Each finished chunk leaves
``part-CCCCCC.array_record`` and ``part-CCCCCC.json`` (written atomically), so a rerun skips
finished chunks (resumable; a chunk is redone if its inputs or the options changed) and
several machines can take disjoint chunks (``--shard_index/--num_shards``) into the same
folder; ``--num_workers`` runs chunks in parallel processes on one machine. Every run rewrites
``manifest.json`` from all finished chunks: source, counts, output size and every skipped file
with its reason; before it replaces any shard it rewrites it with that chunk pending, so a run
that fails part-way never leaves a "complete" manifest over shards it changed. A failed write
(disk full, read-only folder) is one ``error:`` line naming the file; temp files of failed or
killed runs are removed.
A bad file (unreadable bytes, truncated, tiny, no face, odd mode) is reported, never fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np

from fasdiff_jax.data import align
from fasdiff_jax.data.sources import (
    MANIFEST, count_records, decode_image_file, encode_record, list_images, parse_tfds_spec,
    warning_texts,
)
from fasdiff_jax.errors import DataError
from fasdiff_jax.files import file_sha256, remove_stale_temps, write_atomically, write_failure

FORMAT = "fasdiff-prepared-v1"


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What ``prepare`` does to each image; stored in the manifest."""

    size: int = 256
    min_face_size: int = 64  # detector box side, photo pixels
    min_image_size: int = 64  # shorter side, photo pixels
    min_score: float = 0.5  # dlib HOG detection score
    upsample: int = 1
    detect_max_side: int = 1024
    max_faces_per_image: int = 0  # 0 = all detections above the thresholds
    chunk_size: int = 64

    def __post_init__(self) -> None:
        for name in ("size", "min_image_size", "detect_max_side", "chunk_size"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_face_size", "upsample", "max_faces_per_image"):
            if getattr(self, name) < 0:
                raise DataError(f"--{name} must be >= 0, got {getattr(self, name)}")


def _load_photo(source: str, key: str, tfds_data_dir: str | None) -> np.ndarray:
    """uint8 RGB photo for one input key; DataError with a readable reason otherwise."""
    if source.startswith("tfds:"):
        return _tfds_source(source, tfds_data_dir)[int(key.rpartition("/")[2])]["image"]
    return decode_image_file(os.path.join(source, key))


_TFDS_CACHE: dict[tuple[str, str | None], Any] = {}


def _tfds_source(source: str, data_dir: str | None):
    key = (source, data_dir)
    if key not in _TFDS_CACHE:
        from fasdiff_jax.data.sources import TfdsSource

        name, split = parse_tfds_spec(source)
        _TFDS_CACHE[key] = TfdsSource(name, split, data_dir=data_dir)
    return _TFDS_CACHE[key]


def process_photo(image: np.ndarray,
                  opts: PrepareOptions) -> tuple[list[tuple[np.ndarray, dict]], str | None]:
    """Aligned faces of one photo with their metadata, or ([], reason) when none qualify."""
    h, w = image.shape[:2]
    if min(h, w) < opts.min_image_size:
        return [], f"too small: {w}x{h} < {opts.min_image_size} px"
    faces = align.detect_faces(
        image, min_face_size=opts.min_face_size, upsample=opts.upsample,
        detect_max_side=opts.detect_max_side, min_score=opts.min_score,
    )
    if opts.max_faces_per_image:
        faces = faces[: opts.max_faces_per_image]
    if not faces:
        return [], (f"no face (box >= {opts.min_face_size} px, score >= {opts.min_score})")
    out = []
    for i, face in enumerate(faces):
        aligned, affine = align.align_face(image, face.landmarks, opts.size)
        lm = align.apply_affine(affine, face.landmarks)
        out.append((aligned, {"face": i, "box": list(face.box), "score": round(face.score, 4),
                              "landmarks": np.round(lm, 2).tolist()}))
    return out, None


def _chunk_paths(output: str, chunk: int) -> tuple[str, str]:
    base = os.path.join(output, f"part-{chunk:06d}")
    return base + ".array_record", base + ".json"


def input_stamps(source: str, keys: list[str], tfds_data_dir: str | None = None) -> list[Any]:
    """What identifies a chunk's inputs beyond their names: each file's (size, mtime_ns), None
    for one that cannot be read; for a TFDS source its spec and data folder. A chunk made from
    another folder whose files have the same names, or from a file replaced since, was reused
    as it was (the manifest naming the new source over the old faces). A folder moved or
    mounted elsewhere keeps its stamps."""
    if source.startswith("tfds:"):
        return [source, tfds_data_dir]
    stamps: list[Any] = []
    for key in keys:
        try:
            st = os.stat(os.path.join(source, key))
            stamps.append([st.st_size, st.st_mtime_ns])
        except OSError:
            stamps.append(None)
    return stamps


def _chunk_done(output: str, chunk: int, keys: list[str], opts: PrepareOptions,
                stamps: list[Any]) -> bool:
    """A chunk is reused only if it holds the same keys (their :func:`input_stamps` too; summaries
    written before those were kept are taken as they are), made with the same options, and its
    shard has the bytes it was written with (sha256 in the summary: a record damaged inside
    a shard whose footer still reads was otherwise reused; hashed only when the shard's size
    or modification time is not the one recorded) -- summaries written before that have its
    footer count the records they say. A damaged or truncated shard is made again,
    so "re-run prepare" mends it."""
    rec, meta = _chunk_paths(output, chunk)
    if not (os.path.isfile(meta) and os.path.isfile(rec)):
        return False
    try:
        with open(meta) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    if not (isinstance(summary, dict) and summary.get("keys") == keys
            and summary.get("options") == dataclasses.asdict(opts)
            and summary.get("inputs", stamps) == stamps):
        return False
    if "sha256" in summary:  # summaries before it kept only the record count
        try:
            st = os.stat(rec)
            if st.st_size != summary.get("size", st.st_size):
                return False
            if st.st_mtime_ns == summary.get("mtime_ns"):
                return True  # not written since (a rerun over 200 GB read it all 2-3 times)
            return file_sha256(rec) == summary["sha256"]  # touched or copied: same bytes?
        except OSError:
            return False
    try:
        return count_records(rec) == summary.get("num_records")
    except DataError:
        return False


def _write(path: str, content: bytes | Callable[[str], None]) -> None:
    """``write_atomically`` (its temp file is removed on failure), a failure as a DataError
    naming ``path`` and the cause: disk full, read-only folder, a folder in the way."""
    try:
        write_atomically(path, content)
    except (OSError, RuntimeError) as e:
        raise DataError(f"cannot write {path}: {write_failure(e) or e}") from e


def process_chunk(args: tuple[str, str, int, list[str], PrepareOptions, str | None]) -> dict:
    """Align every key of one chunk into its own ArrayRecord file; returns the chunk summary.

    Shard, then summary, each written to a temp name and renamed (temp removed on failure);
    a failed write is a DataError naming the file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source, output, chunk, keys, opts, tfds_data_dir = args
    rec_path, meta_path = _chunk_paths(output, chunk)
    summary: dict[str, Any] = {"chunk": chunk, "keys": keys, "options": dataclasses.asdict(opts),
                               "inputs": input_stamps(source, keys, tfds_data_dir),  # first
                               "file": os.path.basename(rec_path)}

    def write_shard(tmp_rec: str) -> None:
        writer = ArrayRecordWriter(tmp_rec, "group_size:1")
        skipped, noted, num_faces, num_ok = [], [], 0, 0
        try:
            for key in keys:
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        photo = _load_photo(source, key, tfds_data_dir)
                    noted += [{"key": key, "warning": text} for text in warning_texts(caught)]
                    faces, reason = process_photo(photo, opts)
                except DataError as e:
                    faces, reason = [], str(e)
                except Exception as e:  # never let one file stop the run; report it instead
                    faces, reason = [], f"error: {type(e).__name__}: {e}"
                if reason:
                    skipped.append({"key": key, "reason": reason})
                    continue
                num_ok += 1
                for aligned, meta in faces:
                    writer.write(encode_record(aligned, {"key": key, **meta}))
                    num_faces += 1
        except BaseException:
            try:  # let go of the file before write_atomically removes it
                writer.close()
            except RuntimeError:
                pass  # the same failure again
            raise
        writer.close()
        summary.update({"num_records": num_faces, "num_photos_with_faces": num_ok,
                        "skipped": skipped, "warnings": noted, "sha256": file_sha256(tmp_rec),
                        "size": os.stat(tmp_rec).st_size,  # (a rename keeps both)
                        "mtime_ns": os.stat(tmp_rec).st_mtime_ns})

    _write(rec_path, write_shard)
    _write(meta_path, json.dumps(summary).encode())
    return summary


def list_inputs(source: str, tfds_data_dir: str | None = None,
                output: str | None = None) -> list[str]:
    """Sorted keys: relative file paths of a folder (every file, so bad ones get reported)
    or ``SPLIT/INDEX`` for a TFDS source. An ``output`` folder inside the input folder is
    left out: its shards and manifests would otherwise become inputs of the next run,
    shifting every chunk's keys so that nothing is reused."""
    if source.startswith("tfds:"):
        _, split = parse_tfds_spec(source)
        return [f"{split}/{i}" for i in range(len(_tfds_source(source, tfds_data_dir)))]
    if not os.path.exists(source):
        raise DataError(f"input folder does not exist: {source}")
    if not os.path.isdir(source):
        raise DataError(f"--input {source} is a file, not a folder: give the folder of images "
                        f"(searched recursively) or tfds:NAME[:SPLIT]")
    if output is not None and os.path.realpath(output) == os.path.realpath(source):
        raise DataError(f"--output {output} is the --input folder: write the prepared "
                        f"folder elsewhere (a subfolder is fine)")
    # the output folder is not entered, by its own path or through a link
    return list_images(source, all_files=True, exclude=[output] if output is not None else [])


def write_manifest(source: str, output: str, opts: PrepareOptions, keys: list[str],
                   tfds_data_dir: str | None = None) -> dict:
    """Merge all finished chunk summaries into ``manifest.json`` (atomic rewrite)."""
    num_chunks = (len(keys) + opts.chunk_size - 1) // opts.chunk_size
    shards, skipped, noted, pending = [], [], [], []
    photos_ok = 0
    for c in range(num_chunks):
        chunk_keys = keys[c * opts.chunk_size : (c + 1) * opts.chunk_size]
        stamps = input_stamps(source, chunk_keys, tfds_data_dir)
        if not _chunk_done(output, c, chunk_keys, opts, stamps):
            pending.append(c)
            continue
        with open(_chunk_paths(output, c)[1]) as f:
            s = json.load(f)
        shards.append({"file": s["file"], "num_records": s["num_records"]})
        skipped.extend(s["skipped"])
        noted.extend(s.get("warnings", []))  # summaries before they were kept have none
        photos_ok += s["num_photos_with_faces"]
    manifest = {
        "format": FORMAT,
        "source": source,
        "output_size": opts.size,
        "options": dataclasses.asdict(opts),
        "num_inputs": len(keys),
        "num_photos_with_faces": photos_ok,
        "num_faces": sum(s["num_records"] for s in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "warnings": noted,  # Pillow's about files it read (corrupt EXIF, a huge image)
        "shards": shards,
        "pending_chunks": pending,
        "complete": not pending,
    }
    _write(os.path.join(output, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


STALE_MANIFEST_TEMP_S = 60.0  # a manifest write takes milliseconds: older temps are leftovers


def _remove_temps(output: str, chunks: list[int], manifest: bool = False) -> None:
    """Remove temp files left by killed or failed earlier runs (a full disk stays full
    otherwise, and each run added its own): those of ``chunks`` (the chunks this process
    is assigned; with ``--shard_index/--num_shards`` other machines take other chunks)
    whose writer no longer runs here, so a second run of the same command beside this one
    keeps its temps. ``manifest.json`` is written by every machine sharing the folder: its
    temps also wait until older than any write in progress."""
    names = {os.path.basename(p) for c in chunks for p in _chunk_paths(output, c)}
    remove_stale_temps(output, names)
    if manifest:
        remove_stale_temps(output, {MANIFEST}, min_age_s=STALE_MANIFEST_TEMP_S)


def prepare(
    source: str,
    output: str,
    opts: PrepareOptions = PrepareOptions(),
    num_workers: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    tfds_data_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Prepare ``source`` into ``output``; returns the manifest. See the module docstring."""
    if not 0 <= shard_index < num_shards:
        raise DataError(f"--shard_index {shard_index} not in [0, {num_shards})")
    keys = list_inputs(source, tfds_data_dir, output)
    if not keys:  # an empty, but "complete", prepared folder would fail only when used
        raise DataError(f"no files under {source}: nothing to prepare")
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output {output} is a file, not a folder")
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --output folder {output}: {type(e).__name__}: {e}") from e
    num_chunks = (len(keys) + opts.chunk_size - 1) // opts.chunk_size
    mine = list(range(shard_index, num_chunks, num_shards))
    _remove_temps(output, mine, manifest=True)
    todo = []
    for c in mine:
        chunk_keys = keys[c * opts.chunk_size : (c + 1) * opts.chunk_size]
        stamps = input_stamps(source, chunk_keys, tfds_data_dir)
        if not _chunk_done(output, c, chunk_keys, opts, stamps):
            todo.append((source, output, c, chunk_keys, opts, tfds_data_dir))
    if todo:
        # Before any shard is replaced, the manifest stops claiming it: written with these
        # options, it lists the chunks to redo as pending (not complete). A run that fails
        # part-way (disk full, killed) then never leaves a "complete" manifest over shards
        # made with other options; the final write_manifest lists them once redone.
        write_manifest(source, output, opts, keys, tfds_data_dir)
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t[3]) for t in todo), unit="img", disable=not progress,
               desc=f"prepare {os.path.basename(os.path.normpath(source))}")
    try:
        if num_workers > 0 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(num_workers, len(todo)),
                                              initializer=_ignore_sigint) as pool:
                for s in pool.imap_unordered(process_chunk, todo):
                    bar.update(len(s["keys"]))
        else:
            for t in todo:
                s = process_chunk(t)
                bar.update(len(s["keys"]))
    except BaseException:
        # The pool's other workers were terminated mid-chunk, leaving their temp files.
        _remove_temps(output, [t[2] for t in todo])
        raise
    finally:
        bar.close()
    return write_manifest(source, output, opts, keys, tfds_data_dir)


def _ignore_sigint() -> None:
    """In a worker: Ctrl-C reaches the whole process group, and each worker printed its own
    KeyboardInterrupt traceback; the parent stops them (the pool's terminate)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasdiff_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="image folder (recursive) or tfds:NAME[:SPLIT]")
    p.add_argument("--output", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--min_face_size", type=int, default=PrepareOptions.min_face_size)
    p.add_argument("--min_image_size", type=int, default=PrepareOptions.min_image_size)
    p.add_argument("--min_score", type=float, default=PrepareOptions.min_score)
    p.add_argument("--upsample", type=int, default=PrepareOptions.upsample)
    p.add_argument("--max_faces_per_image", type=int, default=0)
    p.add_argument("--chunk_size", type=int, default=PrepareOptions.chunk_size)
    p.add_argument("--num_workers", type=int, default=0, help="worker processes (0: in-process)")
    p.add_argument("--shard_index", type=int, default=0)
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--tfds_data_dir", default=None)
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        opts = PrepareOptions(size=a.size, min_face_size=a.min_face_size,
                              min_image_size=a.min_image_size, min_score=a.min_score,
                              upsample=a.upsample, max_faces_per_image=a.max_faces_per_image,
                              chunk_size=a.chunk_size)
        m = prepare(a.input, a.output, opts, a.num_workers, a.shard_index, a.num_shards,
                    a.tfds_data_dir, progress=not a.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: finished chunks are whole (written atomically)
        print(f"interrupted: the chunks finished so far are kept in {a.output}; rerun the same "
              f"command to go on", file=sys.stderr)
        return 130
    except OSError as e:  # one not turned into a DataError above: still one line, no traceback
        name = f"{e.filename}: " if e.filename else ""
        print(f"error: {name}{e.strerror or e}", file=sys.stderr)
        return 2
    if m["complete"] and not m["num_faces"]:  # training or evaluate would stop on it later
        print(f"error: no faces found in the {m['num_inputs']} inputs under {a.input}; the "
              f"reason for each is in {os.path.join(a.output, MANIFEST)}", file=sys.stderr)
        return 2
    noted = f", {len(m['warnings'])} with warnings" if m["warnings"] else ""
    print(f"{m['num_faces']} faces from {m['num_photos_with_faces']}/{m['num_inputs']} inputs, "
          f"{m['num_skipped']} skipped{noted}, complete={m['complete']} "
          f"({time.time() - t0:.1f}s) -> {os.path.join(a.output, MANIFEST)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
