"""Sources: TFDS (mocked, and a tiny dataset built as ArrayRecord), prepared ArrayRecord
folders, plain folders, embedded default."""

import json
import os
import re
import shutil
import time
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from fasdiff_jax.data.pipeline import DataConfig, make_dataset, make_train_iterator
from fasdiff_jax.data.prepare import PrepareOptions, prepare
from fasdiff_jax.data.sources import (
    FolderSource, TfdsSource, decode_record, encode_record, open_prepared, open_source,
)
from fasdiff_jax.errors import DataError
from fasdiff_jax.sharding import create_mesh
from data_fixtures import embedded_dirs, png_header_only  # noqa: F401 (fixture)


def test_tfds_celeb_a_through_data_source_and_pipeline(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        src = TfdsSource("celeb_a", "train")
        assert len(src) == 6
        item = src[2]
        assert item["image"].dtype == np.uint8 and item["image"].shape == (218, 178, 3)
        ds = make_dataset(DataConfig(source="tfds:celeb_a:train", image_size=32, global_batch_size=3),
                          None, 0, 1)
        b = next(iter(ds))
        assert b["image"].shape == (3, 32, 32, 3)
        # prepare reads TFDS too; mock images are noise, so each is reported, none crash.
        m = prepare("tfds:celeb_a:train", str(tmp_path / "p"),
                    PrepareOptions(size=32, chunk_size=4, upsample=0), progress=False)
        assert m["num_inputs"] == 6 and m["num_skipped"] == 6
        assert all("no face" in s["reason"] for s in m["skipped"])
        assert [s["key"] for s in m["skipped"]] == [f"train/{i}" for i in range(6)]
    with tfds.testing.mock_data(num_examples=3):  # the CelebA-HQ spec string
        src = open_source("tfds:celeb_a_hq/256:train")
        assert isinstance(src, TfdsSource) and len(src) == 3
        assert src[1]["image"].shape == (256, 256, 3) and src[1]["key"] == "train/1"


def test_tfds_split_slices_hold_out_other_images(tmp_path):
    """The real configs train on ``train[:29000]`` and evaluate on ``train[29000:]``. TFDS's
    mock data ignores slices, so this builds a real (tiny) ArrayRecord dataset and reads it
    through our source and the train loop's held-out settings: the two slices are disjoint,
    cover the split, and the held-out batch holds exactly the held-out slice's images."""
    import tensorflow_datasets as tfds

    from configs import tiny
    from fasdiff_jax import train

    class FasdiffSliceFaces(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(16, 16, 3))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):  # image i: every pixel 10 * i
            for i in range(20):
                yield i, {"image": np.full((16, 16, 3), 10 * i, np.uint8)}

    data_dir = str(tmp_path / "tfds")
    FasdiffSliceFaces(data_dir=data_dir, file_format="array_record").download_and_prepare()

    def values(spec):
        src = open_source(spec, data_dir=data_dir)
        return [int(src[i]["image"][0, 0, 0]) for i in range(len(src))]

    whole, first, rest = (values(f"tfds:fasdiff_slice_faces:{split}")
                          for split in ("train", "train[:12]", "train[12:]"))
    assert sorted(whole) == list(range(0, 200, 10)) and whole == first + rest
    assert len(first) == 12 and len(rest) == 8

    cfg = tiny.get_config()
    cfg.data.update(source="tfds:fasdiff_slice_faces:train[:12]", tfds_data_dir=data_dir,
                    image_size=16, global_batch_size=8)
    cfg.eval.update(source="tfds:fasdiff_slice_faces:train[12:]", every_steps=1, batch_size=8)
    held = train.held_out_settings(cfg, create_mesh({"data": 8}), 10)
    assert len(held.source) == 8 and held.batches == 1
    batch = next(iter(make_dataset(held.data, held.source, 0, 1)))["image"]
    assert batch.shape == (8, 16, 16, 3)
    assert sorted(int(im[0, 0, 0]) for im in batch) == sorted(rest)
    assert all((im == im[0, 0, 0]).all() for im in batch)  # whole images, not augmented


def test_tfds_missing_dataset_is_a_readable_error(tmp_path):
    with pytest.raises(DataError, match="celeb_a_hq.*file_format=array_record"):
        TfdsSource("celeb_a_hq", "train", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="celeb_a_hq"):  # the prepare CLI's source too
        prepare("tfds:celeb_a_hq", str(tmp_path / "out"), progress=False, tfds_data_dir=str(tmp_path))
    assert not (tmp_path / "out").exists()
    # a name TFDS does not know: its error listed every one it does (460 lines)
    with pytest.raises(DataError) as e:
        TfdsSource("nosuch_dataset_xyz", "train", data_dir=str(tmp_path))
    assert "nosuch_dataset_xyz" in str(e.value) and "\n" not in str(e.value)
    assert len(str(e.value)) < 800, str(e.value)


def test_linked_folders_are_followed_once_and_a_link_loop_ends(tmp_path):
    """A linked subfolder's images were left out without a word (os.walk does not follow)."""
    from fasdiff_jax.data.sources import list_images

    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "far.png")
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(top / "near.png")
    Image.new("RGB", (8, 8)).save(top / "sub" / "deep.png")
    (top / "linked").symlink_to(tmp_path / "outside")
    (top / "sub" / "loop").symlink_to(top)  # back to the top: followed no further
    (top / "twin").symlink_to(top / "sub")  # the same folder twice: listed once
    assert list_images(str(top)) == ["linked/far.png", "near.png", "sub/deep.png"]
    assert len(open_source(f"folder:{top}")) == 3


def test_record_roundtrip_and_bad_record():
    img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    out = decode_record(encode_record(img, {"key": "a/b.png", "face": 0}))
    np.testing.assert_array_equal(out["image"], img)
    assert out["key"] == "a/b.png"
    with pytest.raises(DataError, match="not a fasdiff record"):
        decode_record(b"JUNK" + bytes(10))


def test_prepared_and_embedded(embedded_dirs):
    train, held = open_prepared(embedded_dirs["train"]), open_prepared(embedded_dirs["heldout"])
    for src in (train, held):
        for i in range(len(src)):
            assert src[i]["image"].shape == (256, 256, 3) and src[i]["image"].dtype == np.uint8
    keys = lambda s: {s[i]["key"] for i in range(len(s))}  # noqa: E731
    assert not keys(train) & keys(held)  # disjoint by source photograph
    assert (len(train), len(held)) == (29, 9)  # the counts the README states
    assert [train[i]["kind"] for i in range(len(train))].count("face") == 1
    assert [held[i]["kind"] for i in range(len(held))].count("face") == 1
    with open(os.path.join(embedded_dirs["train"], "manifest.json")) as f:
        assert json.load(f)["face_photos"] == ["skimage/astronaut.png"]
    # Same cache -> no rebuild; spec strings reach it.
    cache = os.path.dirname(os.path.dirname(embedded_dirs["train"]))
    assert len(open_source("embedded:heldout", cache_dir=cache)) == len(held)
    assert len(open_source(embedded_dirs["train"])) == len(train)


def test_embedded_photo_errors(monkeypatch):
    import importlib.util

    from fasdiff_jax.data import embedded

    with pytest.raises(DataError, match="unknown photo package"):
        embedded.photo_path("torch", "x.png")
    with pytest.raises(DataError, match="bundled photo missing"):
        embedded.photo_path("skimage", "no_such_photo.png")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install scikit-image"):
        embedded.photo_path("skimage", "astronaut.png")


def test_folder_source_and_pipeline(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a" / "b").mkdir(parents=True)
    paths = ["x.png", "a/y.jpg", "a/b/z.png"]
    for i, p in enumerate(paths):
        Image.fromarray(rng.integers(0, 255, (30 + 10 * i, 40, 3), dtype=np.uint8)).save(tmp_path / p)
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "gray.png")
    (tmp_path / "readme.txt").write_text("ignored")
    src = open_source(f"folder:{tmp_path}")
    assert isinstance(src, FolderSource) and len(src) == 4
    assert src[src.files.index("gray.png")]["image"].shape == (20, 20, 3)
    mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    it = make_train_iterator({"source": str(tmp_path), "image_size": 16, "global_batch_size": 2}, mesh)
    assert next(it)["image"].shape == (2, 16, 16, 3)
    with pytest.raises(DataError, match="no image files"):
        FolderSource(_empty(tmp_path))
    # files that are not images stop the source at its opening, every one named (a training
    # run used to stop at the step that first read one, and again at every resume)
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match=re.escape(
            f"2 of 6 files under {tmp_path} are not images that can be read (a/empty.png: "
            f"empty file; notes.jpg: unreadable: not a recognised image format); remove them")):
        open_source(f"folder:{tmp_path}")
    # a file cut after its header opens, and names itself with what to do when read
    (tmp_path / "a" / "empty.png").unlink()
    (tmp_path / "notes.jpg").unlink()
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[: len(data) // 2])
    src = open_source(f"folder:{tmp_path}")
    with pytest.raises(DataError, match=re.escape(f"cannot decode image {tmp_path / 'x.png'}: "
                                                  f"truncated image")) as e:
        src[src.files.index("x.png")]
    assert str(e.value).endswith("replace or remove the file and rerun the command: training "
                                 "and evaluate resume where they stopped")
    with pytest.raises(DataError, match="unknown data source"):
        open_source("nowhere:/x")
    with pytest.raises(DataError, match="not a prepared folder"):
        open_prepared(tmp_path)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def _write_prepared(d, n: int = 3) -> str:
    """A prepared folder of ``n`` tiny records in one shard, written directly (no detector)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    d.mkdir()
    rng = np.random.default_rng(0)
    writer = ArrayRecordWriter(str(d / "part-000000.array_record"), "group_size:1")
    for i in range(n):
        writer.write(encode_record(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), {"key": f"k{i}"}))
    writer.close()
    (d / "manifest.json").write_text(json.dumps(
        {"shards": [{"file": "part-000000.array_record", "num_records": n}]}))
    return str(d / "part-000000.array_record")


@pytest.mark.parametrize("text, message", [
    ('{"shards": [\n', r"manifest.json is not valid JSON \(Expecting value: line 2"),
    ("[1, 2]", "manifest.json holds a JSON list, not the object prepare writes"),
    ('{"shards": {"file": "a"}}', r'manifest.json: "shards" must be a list, got dict'),
    ('{"shards": [{"num_records": 3}]}', r'manifest.json: shards\[0\] has no "file" name'),
    ('{"shards": [7]}', r'manifest.json: shards\[0\] has no "file" name \(7\)'),
    ('{"shards": [{"file": "p", "num_records": "3"}]}',
     r"manifest.json: shards\[0\].num_records must be a whole number >= 0, got '3'"),
])
def test_prepared_manifest_of_wrong_shape_names_it(tmp_path, text, message):
    """A damaged manifest was an AttributeError, a KeyError 'file' or a bare JSON message."""
    _write_prepared(tmp_path / "p")
    (tmp_path / "p" / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "p")) + "/" + message):
        open_source(f"prepared:{tmp_path / 'p'}")


def test_damaged_shard_is_named_at_open_or_when_read(tmp_path):
    """array_record's RuntimeErrors (a traceback from training and evaluate) become DataErrors
    naming the shard: at opening for a damaged footer, when read for a damaged record."""
    shard = _write_prepared(tmp_path / "p")
    data = open(shard, "rb").read()
    src = open_prepared(tmp_path / "p")
    assert len(src) == 3 and [src[i]["key"] for i in range(3)] == ["k0", "k1", "k2"]
    with pytest.raises(IndexError):
        src[3]
    named = "^" + re.escape(f"corrupt or truncated shard {shard} (RuntimeError")
    for damaged in (os.urandom(5000), data[: len(data) // 2], data[: len(data) * 3 // 4],
                    data[:65536] + bytes(512) + data[65536 + 512:]):
        open(shard, "wb").write(damaged)
        with pytest.raises(DataError, match=named):
            open_source(f"prepared:{tmp_path / 'p'}")
    # the first record's bytes zeroed: the folder opens, and that record names the shard
    open(shard, "wb").write(data[:100] + bytes(60) + data[160:])
    src = open_prepared(tmp_path / "p")
    assert src[1]["key"] == "k1"
    with pytest.raises(DataError, match=named + ".*chunk data hash mismatch.*re-run "
                       "python -m fasdiff_jax.data.prepare with the same options"):
        src[0]
    # ... and so does the training pipeline reading it on its threads
    ds = make_dataset(DataConfig(source=f"prepared:{tmp_path / 'p'}", image_size=8,
                                 global_batch_size=3, shuffle=False), None, 0, 1)
    with pytest.raises(DataError, match=named):
        next(iter(ds))


def test_unknown_embedded_split_lists_the_valid_ones(tmp_path):
    """Was ``KeyError: 'bogus'``, after building the embedded default."""
    for spec, split in (("embedded:bogus", "bogus"), ("embedded:train:x", "train:x")):
        with pytest.raises(DataError, match=re.escape(
                f"unknown embedded split {split!r} in {spec!r}: use embedded:train or "
                f"embedded:heldout")):
            open_source(spec, cache_dir=str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing built for a bad spec


def test_a_damaged_embedded_cache_says_to_delete_it(embedded_dirs, tmp_path):  # noqa: F811
    """prepare's advice (delete the shard, re-run prepare) does not rebuild the embedded
    default; deleting its cache folder does."""
    root = os.path.dirname(embedded_dirs["train"])
    cache = tmp_path / "cache"
    shutil.copytree(root, cache / os.path.basename(root))
    shard = next((cache / os.path.basename(root) / "heldout").glob("*.array_record"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=re.escape(
            f"Delete {cache / os.path.basename(root)}; it is rebuilt on next use")):
        open_source("embedded:heldout", cache_dir=str(cache))
    assert len(open_source("embedded:train", cache_dir=str(cache))) > 0


def test_embedded_build_on_a_full_or_read_only_disk_is_a_data_error(tmp_path, monkeypatch):
    """Was ``RuntimeError: write() failed: No space left on device; writing
    .../.embedded-build-.../part-000000.array_record``, a traceback in evaluate and training."""
    import errno
    import tempfile

    from array_record.python import array_record_module

    from fasdiff_jax.data import embedded

    real = array_record_module.ArrayRecordWriter

    class DiskFull:
        def __init__(self, path, options):
            self._writer, self._path = real(path, options), path

        def write(self, record):
            raise RuntimeError(f"write() failed: No space left on device; writing {self._path}; "
                               f"at byte 0")

        def close(self):
            self._writer.close()

    with monkeypatch.context() as m:
        m.setattr(array_record_module, "ArrayRecordWriter", DiskFull)
        with pytest.raises(DataError, match=re.escape(
                f"cannot build the embedded dataset in {tmp_path}: No space left on device "
                f"(set FASDIFF_CACHE to a folder with 3 MB free)")):
            embedded.embedded_dataset(cache_dir=str(tmp_path), size=64)
    assert os.listdir(tmp_path) == []  # the temp build folder is removed
    # a killed build's folder (kill -9 skips the cleanup) is removed once abandoned
    old_build = tmp_path / f"{embedded.BUILD_PREFIX}old"
    recent = tmp_path / f"{embedded.BUILD_PREFIX}recent"
    for d in (old_build, recent):
        (d / "train").mkdir(parents=True)
    os.utime(old_build, (time.time() - embedded.ABANDONED_BUILD_S - 1,) * 2)
    embedded._remove_abandoned_builds(str(tmp_path))
    assert os.listdir(tmp_path) == [recent.name]  # a build going on elsewhere stays
    shutil.rmtree(recent)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(DataError, match=re.escape(
            f"cannot build the embedded dataset in {tmp_path}: Read-only file system "
            f"(set FASDIFF_CACHE to a writable folder with 3 MB free)")):
        embedded.embedded_dataset(cache_dir=str(tmp_path), size=64)


# Image files: damaged, oversized or of wide modes (tiny files built here, not shipped).

def _ifd_entries(data: bytes, ifd: int):
    """(byte offset, tag) of each entry of the little-endian TIFF IFD at ``ifd``."""
    import struct

    (n,) = struct.unpack("<H", data[ifd:ifd + 2])
    return [(ifd + 2 + 12 * i, struct.unpack("<H", data[ifd + 2 + 12 * i:ifd + 4 + 12 * i])[0])
            for i in range(n)]


def _damaged_multi_frame(folder):
    """A 3-page TIFF whose second page lost its width, and a 3-frame GIF cut inside its
    later frames: frame 1 decodes, counting the frames makes Pillow raise TypeError and
    IndexError (asserted, so the files keep testing what they are meant to)."""
    import io
    import struct

    frames = [Image.new("L", (8, 8), v) for v in (10, 90, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    tif = bytearray(buf.getvalue())
    first = struct.unpack("<I", tif[4:8])[0]
    end = _ifd_entries(tif, first)[-1][0] + 12
    second = struct.unpack("<I", tif[end:end + 4])[0]
    for at, tag in _ifd_entries(tif, second):
        if tag == 256:  # ImageWidth -> an unknown tag
            tif[at:at + 2] = struct.pack("<H", 65000)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    gif = buf.getvalue()[:-30]
    paths = [folder / "pages.tif", folder / "anim.gif"]
    for path, data, error in zip(paths, (bytes(tif), gif), (TypeError, IndexError)):
        path.write_bytes(data)
        with Image.open(path) as im, pytest.raises(error):
            im.n_frames
    return paths


def test_damaged_later_frames_neither_fail_the_file_nor_its_frame_count(tmp_path):
    """frame_count walked every frame and let Pillow's TypeError/IndexError out: the codec
    stopped with a traceback on a file whose first frame (all it codes) decodes."""
    from fasdiff_jax.data.sources import frame_count, header_error, read_image

    for path in _damaged_multi_frame(tmp_path):
        assert read_image(str(path)).shape == (8, 8, 3)
        assert frame_count(str(path)) == 1
        assert header_error(str(path)) is None


def _tiff_with_rational_strip_offsets(path):
    """A TIFF whose StripOffsets tag says RATIONAL: Pillow's decoder raises TypeError."""
    import io
    import struct

    buf = io.BytesIO()
    Image.new("L", (8, 8), 10).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    for at, tag in _ifd_entries(data, struct.unpack("<I", data[4:8])[0]):
        if tag == 273:
            data[at + 2:at + 4] = struct.pack("<H", 5)
    path.write_bytes(bytes(data))
    return path


def test_whatever_pillow_raises_decoding_a_file_is_that_files_data_error(tmp_path, monkeypatch):
    """Pillow's plugins raise TypeError (and KeyError, IndexError...) on damaged files; it
    escaped the codec and evaluate as a traceback. Running out of memory or Ctrl-C is not
    the file's fault: not reported as a corrupt image."""
    from PIL import ImageFile

    from fasdiff_jax.data.sources import read_image
    from fasdiff_jax.errors import OutOfMemoryError

    path = _tiff_with_rational_strip_offsets(tmp_path / "bad.tif")
    with pytest.raises(DataError, match=re.escape(
            f"cannot decode image {path}: corrupt image: TypeError: 'IFDRational' object")):
        read_image(str(path))
    good = tmp_path / "good.png"
    Image.new("RGB", (6, 4)).save(good)

    def load_raising(error):
        def load(self):
            raise error
        return load

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_raising(MemoryError()))
    with pytest.raises(OutOfMemoryError, match=re.escape(
            f"cannot decode image {good}: out of memory decoding it (4x6 pixels)")) as e:
        read_image(str(good))
    assert not isinstance(e.value, DataError)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load_raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        read_image(str(good))


def test_an_image_over_the_callers_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    """A small all-zero PNG asking for more pixels than the codec's decoders take was decoded
    whole (13300x13300: 2.8 GB) before being refused; now its header refuses it."""
    from PIL import ImageFile

    from fasdiff_jax.data.sources import read_image

    path = tmp_path / "zeros.png"
    Image.new("L", (300, 200)).save(path)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees: 200x300, the same pixel count
    Image.new("L", (20, 30)).save(tmp_path / "rotated.png", exif=exif.tobytes())
    assert read_image(str(tmp_path / "rotated.png"), max_pixels=600).shape == (20, 30, 3)
    assert read_image(str(path), max_pixels=60000).shape == (200, 300, 3)
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self.size) or real_load(self))
    for name, limit in (("zeros.png", 59999), ("rotated.png", 599)):
        with pytest.raises(DataError, match=r"image of \d+x\d+ pixels exceeds the decoders' "
                                            f"limit of {limit} pixels; code it in tiles"):
            read_image(str(tmp_path / name), max_pixels=limit)
    assert loads == []  # refused before decoding
    # over Pillow's warning threshold (89 M pixels), under its error one: no warning either
    (tmp_path / "huge.png").write_bytes(png_header_only(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="image of 10000x10000 pixels exceeds"):
            read_image(str(tmp_path / "huge.png"), max_pixels=1 << 24)


def test_a_folder_source_refuses_images_over_its_pixel_limit_from_their_headers(tmp_path,
                                                                              monkeypatch):
    """evaluate's folder source decoded an image up to Pillow's bomb limit (179 M pixels)
    before the codec's 2^24 refused it; with a limit the folder's opening names it."""
    from PIL import ImageFile

    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    (tmp_path / "huge.png").write_bytes(png_header_only(10000, 10000))
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(DataError, match=re.escape(
            f"1 of 2 files under {tmp_path} are not images that can be read (huge.png: image of "
            f"10000x10000 pixels exceeds the decoders' limit of 16777216 pixels; code it")):
        open_source(str(tmp_path), max_pixels=1 << 24)
    assert loads == []
    (tmp_path / "huge.png").unlink()
    Image.new("RGB", (41, 30)).save(tmp_path / "wide.png")  # past the opening check: read refuses
    src = open_source(f"folder:{tmp_path}", max_pixels=1230)
    assert src[src.files.index("small.png")]["image"].shape == (30, 40, 3)
    (tmp_path / "wide.png").write_bytes(png_header_only(100, 100))
    with pytest.raises(DataError, match="wide.png: image of 100x100 pixels exceeds"):
        src[src.files.index("wide.png")]
    assert len(open_source(str(tmp_path))) == 2  # no limit: training's folders

@pytest.mark.parametrize("mode, values, want", [
    ("F", (0.5, 0.5), (128, 128)),  # a flat grey was stretched to black
    ("F", (0.4, 0.6), (102, 153)),  # and a narrow range to 0..255
    ("F", (0.0, 1.0), (0, 255)),
    ("I", (40000, 40000), (156, 156)),  # 32-bit ints as 16-bit: / 257
    ("I", (0, 65535), (0, 255)),
    ("I", (0, 0), (0, 0)),  # black either way
])
def test_wide_gray_modes_map_by_their_range_not_the_images(tmp_path, mode, values, want):
    from fasdiff_jax.data.sources import read_image

    arr = np.linspace(*values, 16, dtype=np.float32 if mode == "F" else np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(np.tile(arr, (4, 1)), mode).save(path)
    out = read_image(str(path), keep_gray=True)
    assert (out[0, 0, 0], out[0, -1, 0]) == want


@pytest.mark.parametrize("mode, values, found", [
    ("I", (0, 196605), "0..196605, outside the 0..65535"),
    ("I", (-5, 100), "-5..100, outside the 0..65535"),
    ("F", (-0.5, 2.0), "-0.5..2, outside the 0..1"),
    ("I", (0, 255), "0..255: 8-bit values in a 32-bit file"),  # was silently near black
])
def test_wide_gray_values_outside_the_modes_range_are_named(tmp_path, mode, values, found):
    from fasdiff_jax.data.sources import read_image

    path = tmp_path / "wide.tif"
    arr = np.array([values], np.float32 if mode == "F" else np.int32)
    Image.fromarray(arr, mode).save(path)
    with pytest.raises(DataError, match=re.escape(
            f"cannot decode image {path}: mode {mode}") + ".* pixel values span " + re.escape(
            found)):
        read_image(str(path))
