"""prepare: bad and odd files are reported, never fatal; resumable; sharded; alignment quality."""

import dataclasses
import errno
import io
import json
import os
import re
import subprocess
import sys
import time

import matplotlib
import numpy as np
import pytest
from PIL import Image

from fasdiff_jax.data import align
from fasdiff_jax.data import prepare as prepare_module
from fasdiff_jax.data.embedded import photo_path
from fasdiff_jax.data.prepare import PrepareOptions, main, prepare, process_photo
from fasdiff_jax.data.sources import open_prepared, read_image
from fasdiff_jax.files import file_sha256
from fasdiff_jax.errors import DataError
from data_fixtures import embedded_dirs  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GRACE = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
OPTS = PrepareOptions(size=64, min_face_size=40, min_image_size=48, chunk_size=4)


def _grace_small() -> Image.Image:
    im = Image.open(GRACE).convert("RGB")
    return im.resize((im.width // 2, im.height // 2), Image.LANCZOS)  # face ~90 px: fast HOG


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """Grace Hopper in every odd mode (each must give one face) plus files that must be skipped."""
    d = tmp_path_factory.mktemp("odd")
    (d / "sub" / "deeper").mkdir(parents=True)
    g = _grace_small()
    g.convert("L").save(d / "gray_L.png")
    g.convert("LA").save(d / "gray_LA.png")
    g.convert("P", palette=Image.ADAPTIVE).save(d / "palette_P.png")
    g.convert("CMYK").save(d / "cmyk.jpg")
    i16 = (np.asarray(g.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(i16).save(d / "sixteen_bit.png")
    rgba = g.convert("RGBA")
    rgba.save(d / "sub" / "deeper" / "rgba.png")
    # Stored rotated, with an EXIF orientation tag (6: rotate 90 CW to view) restoring it.
    exif = Image.Exif()
    exif[0x0112] = 6
    g.transpose(Image.Transpose.ROTATE_90).save(d / "exif_rotated.jpg", exif=exif.tobytes())
    buf = io.BytesIO()
    g.save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (d / "garbage.png").write_bytes(os.urandom(3000))
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "bomb.png").write_bytes(_png_header(40000, 40000))
    g.resize((30, 30)).save(d / "tiny.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(d / "noise_noface.png")
    return d


FACES = {"gray_L.png", "gray_LA.png", "palette_P.png", "cmyk.jpg", "sixteen_bit.png",
         "sub/deeper/rgba.png", "exif_rotated.jpg"}
SKIPS = {"truncated.jpg": "truncated", "garbage.png": "unreadable", "empty.jpg": "empty",
         "notes.txt": "unreadable", "tiny.png": "too small", "noise_noface.png": "no face",
         "bomb.png": "too many pixels"}


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming a huge image (no pixel data): PIL's bomb guard."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_odd_and_bad_files_reported_resumable_sharded(odd_folder, tmp_path):
    out = str(tmp_path / "out")
    # Two shards into one folder: after shard 0 the manifest says what is pending.
    m0 = prepare(str(odd_folder), out, OPTS, shard_index=0, num_shards=2, progress=False)
    assert not m0["complete"] and m0["pending_chunks"] == [1, 3]
    assert m0["num_inputs"] == len(FACES) + len(SKIPS) == 14
    # half done, the folder is not a dataset yet: training would have used 1/2 of it
    with pytest.raises(DataError, match=re.escape(
            f"prepared folder {out} is unfinished: {out}/manifest.json lists chunks 1, 3 of "
            f"its input as still to do (prepare was interrupted, or the --shard_index runs")):
        open_prepared(out)
    m = prepare(str(odd_folder), out, OPTS, shard_index=1, num_shards=2, progress=False)
    assert m["complete"] and m["num_inputs"] == len(FACES) + len(SKIPS)
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(SKIPS), skipped
    for key, word in SKIPS.items():
        assert word in skipped[key], (key, skipped[key])
    src = open_prepared(out)
    keys = [src[i]["key"] for i in range(len(src))]
    assert sorted(keys) == sorted(FACES) and m["num_faces"] == len(FACES)
    for i in range(len(src)):
        item = src[i]
        assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.uint8
        # The stored (aligned-space) eye centres sit at the template: EXIF rotation was applied.
        left, right = align.eye_centres(np.asarray(item["landmarks"]))
        assert np.abs(left / 64 - align.TEMPLATE_LEFT_EYE).max() < 0.03, item["key"]
        assert np.abs(right / 64 - align.TEMPLATE_RIGHT_EYE).max() < 0.03, item["key"]

    # Resume: a rerun (CLI) redoes nothing and reproduces the manifest.
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f.startswith("part")}
    assert main(["--input", str(odd_folder), "--output", out, "--size", "64", "--min_face_size", "40",
                 "--min_image_size", "48", "--chunk_size", "4", "--no_progress"]) == 0
    assert mtimes == {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["skipped"] == m["skipped"]

    # A damaged shard (its footer cut off) is made again by a rerun, the others reused.
    shard = max((f for f in mtimes if f.endswith(".array_record")),
                key=lambda f: os.path.getsize(os.path.join(out, f)))
    with open(os.path.join(out, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(out, shard)) // 2)
    with pytest.raises(DataError, match=f"corrupt or truncated shard .*{shard}"):
        open_prepared(out)
    assert prepare(str(odd_folder), out, OPTS, progress=False)["complete"]
    changed = {f for f in mtimes if os.path.getmtime(os.path.join(out, f)) != mtimes[f]}
    assert changed == {shard, shard.replace(".array_record", ".json")}
    assert sorted(open_prepared(out)[i]["key"] for i in range(len(src))) == sorted(keys)

    # A rerun hashes no shard that was not written since its summary (size and mtime as
    # recorded); one touched (or copied) is hashed and, with the same bytes, reused.
    hashed = []
    real_sha = prepare_module.file_sha256
    prepare_module.file_sha256 = lambda p: hashed.append(p) or real_sha(p)
    try:
        assert prepare(str(odd_folder), out, OPTS, progress=False)["complete"] and hashed == []
        os.utime(os.path.join(out, shard))
        mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}
        assert prepare(str(odd_folder), out, OPTS, progress=False)["complete"]
        assert hashed and {os.path.basename(p) for p in hashed} == {shard}
        assert all(os.path.getmtime(os.path.join(out, f)) == mtimes[f] for f in mtimes)
    finally:
        prepare_module.file_sha256 = real_sha

    # A byte flipped inside a record (the footer still reads, the folder opens): the shard
    # no longer has the sha256 its summary keeps, so a rerun makes it again too.
    path = os.path.join(out, shard)
    with open(path, "r+b") as f:
        f.seek(5000)  # inside the first record (the file is padded to 64 KiB blocks)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))
    damaged = open_prepared(out)
    with pytest.raises(DataError, match=re.escape(shard)):
        [damaged[i] for i in range(len(damaged))]
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}
    assert prepare(str(odd_folder), out, OPTS, progress=False)["complete"]
    changed = {f for f in mtimes if os.path.getmtime(os.path.join(out, f)) != mtimes[f]}
    assert changed == {shard, shard.replace(".array_record", ".json")}
    assert sorted(open_prepared(out)[i]["key"] for i in range(len(src))) == sorted(keys)
    # a summary written before shards had a sha256 is checked by its record count instead
    summary_path = os.path.join(out, shard.replace(".array_record", ".json"))
    with open(summary_path) as f:
        summary = json.load(f)
    del summary["sha256"]
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}
    assert prepare(str(odd_folder), out, OPTS, progress=False)["complete"]
    assert all(os.path.getmtime(os.path.join(out, f)) == mtimes[f] for f in mtimes)


def test_a_chunk_is_redone_when_its_input_files_change(tmp_path, monkeypatch):
    """Chunks were matched by file names and options only: prepare of folder B into A's
    output (same names) finished in 0.1 s with A's faces under a manifest naming B, and a
    file replaced in place kept its old face. Now each file's size and mtime are kept too."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    g = _grace_small()
    g.save(a / "img.png")
    g.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(b / "img.png")
    os.utime(b / "img.png", ns=(1, 10**18))  # other bytes, not just a later mtime
    out = str(tmp_path / "out")
    made = []
    real = prepare_module.process_chunk
    monkeypatch.setattr(prepare_module, "process_chunk", lambda t: made.append(t[0]) or real(t))

    def face() -> np.ndarray:
        return open_prepared(out)[0]["image"]

    prepare(str(a), out, OPTS, progress=False)
    face_a = face()
    prepare(str(a), out, OPTS, progress=False)  # nothing changed: reused
    m = prepare(str(b), out, OPTS, progress=False)
    assert made == [str(a), str(b)] and m["source"] == str(b)  # (reused A's before)
    face_b = face()
    assert not np.array_equal(face_b, face_a)
    prepare(str(b), str(tmp_path / "fresh"), OPTS, progress=False)
    np.testing.assert_array_equal(face_b, open_prepared(str(tmp_path / "fresh"))[0]["image"])
    moved = tmp_path / "moved"
    os.rename(b, moved)  # a folder moved (or mounted elsewhere) keeps its stamps: reused
    prepare(str(moved), out, OPTS, progress=False)
    assert made == [str(a), str(b), str(b)]  # (the fresh folder's)
    g.save(moved / "img.png")  # replaced in place
    prepare(str(moved), out, OPTS, progress=False)
    assert made[-1] == str(moved)
    np.testing.assert_array_equal(face(), face_a)
    # a summary written before the stamps were kept is reused as it was
    summary_path = os.path.join(out, "part-000000.json")
    with open(summary_path) as f:
        summary = json.load(f)
    del summary["inputs"]
    with open(summary_path, "w") as f:
        json.dump(summary, f)
    prepare(str(moved), out, OPTS, progress=False)
    assert len(made) == 4

def test_missing_input_and_bad_options_are_readable_errors(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "input folder does not exist" in capsys.readouterr().err
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--size", "0"]) == 2
    assert "--size must be >= 1" in capsys.readouterr().err


def _variants(photo: np.ndarray) -> dict[str, np.ndarray]:
    """The photo as is, rotated both ways, shrunk and enlarged (alignment must undo each)."""
    im = Image.fromarray(photo)
    return {
        "as_is": photo,
        "rot+12": np.asarray(im.rotate(12, Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))),
        "rot-10": np.asarray(im.rotate(-10, Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))),
        "x0.7": np.asarray(im.resize((im.width * 7 // 10, im.height * 7 // 10), Image.LANCZOS)),
        "x1.5": np.asarray(im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.LANCZOS)),
    }


def test_alignment_quality_on_real_photos(embedded_dirs):
    """Re-detect dlib landmarks on aligned real faces: eyes within 3% of the template.

    The two real faces (the embedded default's astronaut and Grace Hopper), plus each
    photo rotated by +12/-10 degrees and rescaled x0.7/x1.5 before alignment.
    """
    errors = {}
    opts = PrepareOptions(size=256, min_face_size=48)
    for name in ("skimage/astronaut.png", "matplotlib/grace_hopper.jpg"):
        photo = read_image(photo_path(*name.split("/")))
        for variant, img in _variants(photo).items():
            faces, reason = process_photo(img, opts)
            assert reason is None and len(faces) == 1, (name, variant, reason)
            aligned = faces[0][0]
            redetected = align.detect_faces(aligned, min_face_size=64, upsample=0)
            assert len(redetected) == 1, (name, variant)
            left, right = align.eye_centres(redetected[0].landmarks)
            err = max(np.abs(left / 256 - align.TEMPLATE_LEFT_EYE).max(),
                      np.abs(right / 256 - align.TEMPLATE_RIGHT_EYE).max())
            errors[f"{name}:{variant}"] = float(err)
    print("eye error / image size:", {k: round(v, 4) for k, v in errors.items()})
    assert len(errors) == 10 and max(errors.values()) < 0.03, errors
    # The embedded faces are these same alignments (stored as written by prepare).
    for split, key in (("train", "skimage/astronaut.png"), ("heldout", "matplotlib/grace_hopper.jpg")):
        src = open_prepared(embedded_dirs[split])
        faces = [src[i] for i in range(len(src)) if src[i].get("kind") == "face"]
        assert [f["key"] for f in faces] == [key]
        left, right = align.eye_centres(np.asarray(faces[0]["landmarks"]))
        assert np.abs(left / 256 - align.TEMPLATE_LEFT_EYE).max() < 0.03


def test_bad_arguments_are_readable_errors():
    with pytest.raises(DataError, match="uint8"):
        align.detect_faces(np.zeros((32, 32), np.float32))
    with pytest.raises(DataError, match="shard_index"):
        prepare("unused", "unused", shard_index=2, num_shards=2, progress=False)


def test_cli_parallel_progress_resume_and_option_change(tmp_path):
    """The CLI in a subprocess: 2 worker processes, a progress bar, a manifest; then a
    rerun with another size redoes the chunks (options are part of resumability)."""
    import subprocess
    import sys

    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    _grace_small().save(src / "grace.png")
    _grace_small().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "nested" / "mirror.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "fasdiff_jax.data.prepare", "--input", str(src), "--output", str(out),
           "--size", "48", "--min_face_size", "40", "--chunk_size", "1", "--num_workers", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3/3" in r.stderr and "img" in r.stderr, r.stderr[-2000:]  # tqdm progress bar
    assert "2 faces from 2/3 inputs, 1 skipped, complete=True" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [s["key"] for s in m["skipped"]] == ["broken.png"]
    assert m["output_size"] == 48 and len(m["shards"]) == 3
    src_ds = open_prepared(out)
    assert sorted(src_ds[i]["key"] for i in range(2)) == ["grace.png", "nested/mirror.jpg"]
    assert src_ds[0]["image"].shape == (48, 48, 3)
    # Same output folder, new size: nothing stale is reused.
    m2 = prepare(str(src), str(out), PrepareOptions(size=40, min_face_size=40, chunk_size=1),
                 progress=False)
    assert m2["complete"] and m2["num_faces"] == 2
    assert open_prepared(out)[0]["image"].shape == (40, 40, 3)


def _noise_photos(d, names) -> None:
    """Small noise images: no face, so prepare skips each one quickly (HOG on 64 px)."""
    rng = np.random.default_rng(0)
    for name in names:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / name)


def test_output_inside_input_is_not_an_input(tmp_path):
    """A rerun used to list its own manifest and part-* files as inputs: every chunk's keys
    shifted, so all were redone and the manifest listed the shards as skipped inputs."""
    src = tmp_path / "in"
    _noise_photos(src, ["a.png", "b.png", "sub/c.png"])
    out = src / "prepared"
    opts = PrepareOptions(size=32, min_face_size=40, min_image_size=48, upsample=0, chunk_size=2)
    m = prepare(str(src), str(out), opts, progress=False)
    assert m["complete"] and m["num_inputs"] == 3 and len(m["shards"]) == 2
    parts = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.startswith("part-")}
    assert len(parts) == 4
    m2 = prepare(str(src), str(out), opts, progress=False)
    assert m2 == m and [s["key"] for s in m2["skipped"]] == ["a.png", "b.png", "sub/c.png"]
    assert parts == {f: os.path.getmtime(out / f) for f in parts}  # every chunk reused
    assert json.loads((out / "manifest.json").read_text()) == m
    with pytest.raises(DataError, match="is the --input folder"):
        prepare(str(src), str(src), opts, progress=False)
    # reached through a link too (linked folders are followed): not an input either
    (src / "a_link").symlink_to(out)
    assert prepare(str(src), str(out), opts, progress=False) == m
    src2, linked_out = tmp_path / "in2", tmp_path / "elsewhere"
    _noise_photos(src2, ["a.png", "b.png", "sub/c.png"])
    linked_out.mkdir()
    (src2 / "b_link").symlink_to(linked_out)
    assert prepare(str(src2), str(linked_out), opts, progress=False)["num_inputs"] == 3
    assert prepare(str(src2), str(linked_out), opts, progress=False)["num_inputs"] == 3


def test_ctrl_c_is_one_line_and_keeps_the_finished_chunks(tmp_path, monkeypatch, capsys):
    """Ctrl-C printed a 24-28 line KeyboardInterrupt traceback (codec and evaluate: a line)."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _grace_small().rotate(i).save(src / f"g{i}.png")
    real, calls = prepare_module.process_chunk, []

    def interrupted_second(t):
        calls.append(t[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(prepare_module, "process_chunk", interrupted_second)
    out = tmp_path / "out"
    assert main(["--input", str(src), "--output", str(out), "--size", "48", "--min_face_size",
                 "40", "--chunk_size", "1", "--no_progress"]) == 130
    assert capsys.readouterr().err == (f"interrupted: the chunks finished so far are kept in "
                                       f"{out}; rerun the same command to go on\n")
    assert sorted(os.listdir(out)) == ["manifest.json", "part-000000.array_record",
                                       "part-000000.json"]
    monkeypatch.setattr(prepare_module, "process_chunk", real)
    assert prepare(str(src), str(out), PrepareOptions(size=48, min_face_size=40, chunk_size=1),
                   progress=False)["complete"]

def test_ctrl_c_with_worker_processes_is_one_line(tmp_path):
    """Ctrl-C reaches the whole process group: each spawn worker printed its own
    KeyboardInterrupt traceback beside the parent's line."""
    import signal

    src = tmp_path / "in"
    src.mkdir()
    for i in range(24):
        _grace_small().rotate(i).save(src / f"g{i:02d}.png")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "fasdiff_jax.data.prepare", "--input", str(src), "--output",
           str(tmp_path / "out"), "--size", "48", "--min_face_size", "40", "--chunk_size", "2",
           "--num_workers", "2"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    err = ""
    while "2/24" not in err:  # a chunk done: both workers at work
        ch = p.stderr.read(1)
        assert ch, err
        err += ch
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGINT)
    err += p.communicate(timeout=120)[1]
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.rstrip().endswith("rerun the same command to go on"), err[-3000:]

def test_pillows_warnings_go_to_the_manifest_by_file(tmp_path, monkeypatch, capsys):
    """Pillow's warnings (a 95-Mpixel PNG's DecompressionBombWarning, corrupt EXIF) reached
    prepare's output raw, naming Pillow's source line and not the file, from each worker."""
    import warnings

    src = tmp_path / "in"
    src.mkdir()
    _grace_small().save(src / "a.png")
    _grace_small().save(src / "b.png")
    real = prepare_module._load_photo

    def warns(source, key, data_dir):
        if key == "b.png":
            warnings.warn("Corrupt EXIF data.\n  Expecting to read 12 bytes", UserWarning)
            warnings.warn("Corrupt EXIF data.\n  Expecting to read 12 bytes", UserWarning)
        return real(source, key, data_dir)

    monkeypatch.setattr(prepare_module, "_load_photo", warns)
    out = tmp_path / "out"
    assert main(["--input", str(src), "--output", str(out), "--size", "48", "--min_face_size",
                 "40", "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "2 faces from 2/2 inputs, 0 skipped, 1 with warnings, complete=True" in err, err
    assert "UserWarning" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["warnings"] == [{"key": "b.png", "warning": "Corrupt EXIF data. Expecting "
                                                                "to read 12 bytes"}]

def test_cli_bad_input_and_output_paths_are_one_error_line(tmp_path, capsys):
    """Each was a traceback (FileExistsError), a wrong reason, or an exit 0 with a "complete"
    prepared folder that only failed when training or evaluate opened it."""
    photos, empty, afile = tmp_path / "photos", tmp_path / "empty", tmp_path / "afile"
    _noise_photos(photos, ["n.png"])
    empty.mkdir()
    afile.write_text("x")
    cases = [
        (["--input", str(photos), "--output", str(afile)], f"--output {afile} is a file, not a folder"),
        (["--input", str(afile), "--output", str(tmp_path / "o1")], f"--input {afile} is a file, not a folder: give the folder of images (searched recursively) "
         f"or tfds:NAME[:SPLIT]"),
        (["--input", str(empty), "--output", str(tmp_path / "o2")], f"no files under {empty}: nothing to prepare"),
        (["--input", str(photos), "--output", str(tmp_path / "o3"), "--upsample", "0"],
         f"no faces found in the 1 inputs under {photos}; the reason for each is in "
         f"{tmp_path / 'o3' / 'manifest.json'}"),
    ]
    for argv, message in cases:
        assert main(argv + ["--no_progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err == f"error: {message}\n", err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert "no face" in json.loads((tmp_path / "o3" / "manifest.json").read_text())["skipped"][0]["reason"]


def _disk_full_writer(monkeypatch, fail_from: int = 1) -> list[str]:
    """ArrayRecordWriter whose files from the ``fail_from``-th on fail at close as on a full
    disk (the file left half written); returns the paths it was given."""
    from array_record.python import array_record_module

    real, opened = array_record_module.ArrayRecordWriter, []

    class DiskFull:
        def __init__(self, path, options):
            self._writer, self._path = real(path, options), path
            opened.append(path)
            self._fail = len(opened) >= fail_from

        def write(self, record):
            self._writer.write(record)

        def close(self):
            self._writer.close()
            if self._fail:
                raise RuntimeError(f"write() failed: No space left on device; writing "
                                   f"{self._path}; at byte 0; Failed to close chunk_writer")

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", DiskFull)
    return opened


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def _temps(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if ".tmp" in f)


def test_cli_write_failures_are_one_error_line_and_leave_no_temp(tmp_path, monkeypatch, capsys):
    """A full disk, a failed manifest write, a folder named manifest.json: each was a traceback
    that left its pid-named temp file, so a rerun after freeing space still found it full."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _grace_small().save(src / "a.png")
    _noise_photos(src, ["b.png", "c.png"])
    argv = ["--input", str(src), "--output", str(out), "--size", "32", "--min_face_size", "40",
            "--min_image_size", "48", "--chunk_size", "2", "--no_progress"]
    out.mkdir()
    dead = _dead_pid()
    # Leftovers of earlier killed runs: removed at the start, before they fill the disk again.
    for name in (f"part-000000.array_record.tmp-{dead}", f"part-000001.json.tmp-{dead}",
                 f"manifest.json.tmp{dead}"):  # (before the dash: an older version's name)
        (out / name).write_bytes(b"x" * 1000)
        os.utime(out / name, (time.time() - 3600,) * 2)

    with monkeypatch.context() as m:
        opened = _disk_full_writer(m)
        assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: cannot write {out / 'part-000000.array_record'}: "
                                       f"No space left on device\n")
    assert opened and not os.path.exists(opened[0]) and _temps(out) == []

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        if "manifest.json" in os.fspath(path) and "w" in mode:
            real_open(path, mode).close()  # created, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(path, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr("builtins.open", full_open)
        assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: cannot write {out / 'manifest.json'}: "
                                       f"No space left on device\n")
    assert _temps(out) == []

    (out / "manifest.json").unlink()  # the one written before the shards, then a folder
    (out / "manifest.json").mkdir()
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: cannot write {out / 'manifest.json'}: "
                                       f"Is a directory\n")
    assert _temps(out) == []
    (out / "manifest.json").rmdir()

    # With --shard_index/--num_shards, only temps of this process's own chunks are removed
    # (another machine may be writing the others), a manifest temp only once it is old, and
    # none whose writer still runs (the same command started twice: was "cannot write ...:
    # No such file or directory" for both).
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = (f"part-000000.array_record.tmp-{dead}", f"part-000001.array_record.tmp-{dead}",
                 f"manifest.json.tmp-{dead}", f"part-000000.json.tmp-{live.pid}")
        for name in names:
            (out / name).write_bytes(b"x")
        prepare(str(src), str(out), PrepareOptions(size=32, min_face_size=40, min_image_size=48,
                                                   chunk_size=2), shard_index=0, num_shards=2,
                progress=False)
        assert _temps(out) == sorted(names[1:])
        assert main(argv) == 0
        assert _temps(out) == sorted(names[2:])  # young, or its writer runs
    finally:
        live.kill()
        live.wait()
    assert main(argv) == 0
    assert _temps(out) == [names[2]]  # younger than any write could take
    assert json.loads((out / "manifest.json").read_text())["complete"]


def _assert_claims_hold(out) -> dict:
    """Every shard the manifest lists was made with its options and has the bytes its
    summary recorded; its images have the manifest's size."""
    m = json.loads((out / "manifest.json").read_text())
    for shard in m["shards"]:
        summary = json.loads((out / shard["file"].replace(".array_record", ".json")).read_text())
        assert summary["options"] == m["options"], shard
        assert summary["sha256"] == file_sha256(str(out / shard["file"])), shard
    if m["num_faces"]:
        ds = open_prepared(out)
        assert {ds[i]["image"].shape for i in range(len(ds))} == {(m["output_size"],) * 2 + (3,)}
    assert _temps(out) == []
    return m


def test_failed_rerun_with_other_options_never_claims_replaced_shards(tmp_path, monkeypatch):
    """A rerun with another --size replaced shards in place and wrote the manifest last: when
    it failed, the folder said "complete, size 64" over 32 px shards."""
    src, out = tmp_path / "rf", tmp_path / "prepf"
    src.mkdir()
    _grace_small().save(src / "a.png")
    _grace_small().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "b.png")
    opts64 = PrepareOptions(size=64, min_face_size=40, chunk_size=1)
    assert prepare(str(src), str(out), opts64, progress=False)["complete"]
    assert _assert_claims_hold(out)["output_size"] == 64

    # --size 32 fails writing the manifest at the end, after replacing both shards.
    real_write, manifest_writes = prepare_module.write_atomically, []

    def failing_final_manifest(path, content):
        if path.endswith("manifest.json"):
            manifest_writes.append(path)
            if len(manifest_writes) == 2:
                def half(tmp):
                    with open(tmp, "wb") as f:
                        f.write(content[:10])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(path, half)
        return real_write(path, content)

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "write_atomically", failing_final_manifest)
        with pytest.raises(DataError, match="manifest.json: No space left on device"):
            prepare(str(src), str(out), dataclasses.replace(opts64, size=32), progress=False)
    m32 = _assert_claims_hold(out)
    assert not m32["complete"] and m32["pending_chunks"] == [0, 1] and not m32["shards"]

    # --size 48: the disk fills up on the second shard, after the first was replaced.
    opts48 = dataclasses.replace(opts64, size=48)
    with monkeypatch.context() as m:
        _disk_full_writer(m, fail_from=2)
        with pytest.raises(DataError, match="part-000001.array_record: No space left on device"):
            prepare(str(src), str(out), opts48, progress=False)
    m48 = _assert_claims_hold(out)
    assert not m48["complete"] and m48["pending_chunks"] == [0, 1]

    # Once there is space, a rerun finishes the job.
    assert prepare(str(src), str(out), opts48, progress=False)["complete"]
    m = _assert_claims_hold(out)
    assert m["output_size"] == 48 and m["num_faces"] == 2
