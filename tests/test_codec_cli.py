"""``fasdiff_jax.codec``'s command line without a model: batch jobs, refusals, atomic writes.
(The commands on a trained model: ``test_train.py``.)"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
import warnings

import numpy as np

import pytest

from fasdiff_jax import codec, files
from fasdiff_jax.errors import FasdiffError


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_batch_jobs_mirror_folders_and_take_files_by_name(tmp_path):
    _touch(tmp_path / "in" / "a.png")
    _touch(tmp_path / "in" / "s" / "a.JPG")  # same stem, other folder: no clash
    _touch(tmp_path / "in" / "notes.txt")
    _touch(tmp_path / "one.webp")
    jobs = codec.batch_jobs("compress", [str(tmp_path / "in"), str(tmp_path / "one.webp")], "out")
    assert jobs == [(str(tmp_path / "in" / "a.png"), os.path.join("out", "a.fsd")),
                    (str(tmp_path / "in" / "s" / "a.JPG"), os.path.join("out", "s", "a.fsd")),
                    (str(tmp_path / "one.webp"), os.path.join("out", "one.fsd"))]
    _touch(tmp_path / "f" / "x.fsd")
    _touch(tmp_path / "f" / "x.png")
    assert codec.batch_jobs("decompress", [str(tmp_path / "f")], "o") == [
        (str(tmp_path / "f" / "x.fsd"), os.path.join("o", "x.png"))]


@pytest.mark.parametrize("inputs, message", [
    (["a/x.png", "b/x.png"], "would both be written"),
    (["out/y.fsd"], "overwrite the input"),
    (["missing.png"], "no such file or folder"),
    (["empty"], "no image files"),
])
def test_batch_jobs_refuse_before_any_work(tmp_path, inputs, message):
    _touch(tmp_path / "a" / "x.png")
    _touch(tmp_path / "b" / "x.png")
    _touch(tmp_path / "out" / "y.fsd")  # a misnamed image: compressing it into out/ hits itself
    (tmp_path / "empty").mkdir()
    with pytest.raises(FasdiffError, match=message):
        codec.batch_jobs("compress", [str(tmp_path / p) for p in inputs], str(tmp_path / "out"))


def test_command_refuses_clashing_outputs_without_loading_a_model(tmp_path, capsys):
    _touch(tmp_path / "a" / "x.png")
    _touch(tmp_path / "b" / "x.png")
    out = tmp_path / "out"
    rc = codec.main(["compress", str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                     f"--out_dir={out}", "--config=unused.py", f"--workdir={tmp_path / 'none'}"])
    assert rc == 2 and "would both be written" in capsys.readouterr().err
    assert not out.exists()
    rc = codec.main(["compress", str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "x.png"),
                     "--config=unused.py", f"--workdir={tmp_path / 'none'}"])
    assert rc == 2 and "overwrite the input" in capsys.readouterr().err


def test_command_line_shapes(tmp_path):
    with pytest.raises(SystemExit):  # three paths need --out_dir
        codec.main(["compress", "a", "b", "c", "--config=c.py", "--workdir=w"])
    with pytest.raises(SystemExit):
        codec.main(["compress", "a", "b", "--skip_existing", "--config=c.py", "--workdir=w"])


def test_write_atomically_leaves_nothing_half_written(tmp_path):
    dst = tmp_path / "d" / "f.fsd"

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(str(dst), half_then_fail)
    assert os.listdir(tmp_path / "d") == []
    dst.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(str(dst), half_then_fail)
    assert dst.read_bytes() == b"old" and os.listdir(tmp_path / "d") == ["f.fsd"]
    files.write_atomically(str(dst), b"new")
    assert dst.read_bytes() == b"new" and os.listdir(tmp_path / "d") == ["f.fsd"]


@pytest.mark.parametrize("source, message", [
    ("def nothing():\n    pass\n", "defines no get_config()"),
    ("def get_config():\n    return 5\n",
     "must return an ml_collections ConfigDict with a model section, got int"),
    ("def get_config(:\n", "SyntaxError"),
    ("def get_config():\n    raise RuntimeError('no data here')\n", "RuntimeError: no data here"),
])
def test_a_config_file_that_gives_no_config_is_one_error_line(tmp_path, capsys, source, message):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(source)
    _touch(tmp_path / "a.png")
    rc = codec.main(["compress", str(tmp_path / "a.png"), str(tmp_path / "a.fsd"),
                     f"--config={cfg}", f"--workdir={tmp_path / 'none'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --config={cfg}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("saved, message", [
    ("{}", "no model section"),
    ("null", "it holds null, not a JSON object"),
    ("[1, 2]", "it holds [1, 2], not a JSON object"),
    ('{"model": 3}', "no model section"),
    ('{"model": {', "not a readable config"),
])
def test_a_run_config_that_is_not_one_is_named(tmp_path, capsys, saved, message):
    work = tmp_path / "run"
    _touch(work / "config.json", saved.encode())
    _touch(tmp_path / "a.png")
    rc = codec.main(["compress", str(tmp_path / "a.png"), str(tmp_path / "a.fsd"),
                     f"--workdir={work}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{work / 'config.json'}: " in err and message in err, err


def test_a_config_field_of_the_wrong_type_is_a_config_error():
    import ml_collections

    from configs import tiny
    from fasdiff_jax import train

    saved = tiny.get_config().to_dict()
    saved["model"]["image_size"] = "abc"  # a hand-edited config.json
    with pytest.raises(train.TrainConfigError, match="config.model cannot describe a model"):
        train._model_of(ml_collections.ConfigDict(saved))
    del saved["model"]["compressor"]
    saved["model"]["image_size"] = 64
    with pytest.raises(train.TrainConfigError, match="compressor"):
        train._model_of(ml_collections.ConfigDict(saved))


def test_info_on_a_folder_without_files_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert codec.main(["info", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: no .fsd files" in capsys.readouterr().err


def test_a_checkpoints_file_in_place_of_the_folder_is_named(tmp_path, capsys):
    import json

    from configs import tiny

    work = tmp_path / "run"
    _touch(work / "config.json", json.dumps(tiny.get_config().to_dict()).encode())
    _touch(work / "checkpoints")
    _touch(tmp_path / "a.png")
    assert codec.main(["compress", str(tmp_path / "a.png"), str(tmp_path / "a.fsd"),
                       f"--workdir={work}"]) == 2
    assert f"{work / 'checkpoints'}: is a file" in capsys.readouterr().err


def test_a_fifo_is_refused_not_waited_on(tmp_path, capsys):
    """Reading a FIFO named like a file waited forever (info and decompress)."""
    os.mkfifo(tmp_path / "x.fsd")
    assert codec.main(["info", str(tmp_path / "x.fsd")]) == 2
    assert f"{tmp_path / 'x.fsd'}: not a regular file" in capsys.readouterr().err
    assert codec.main(["info", str(tmp_path)]) == 2  # found in a folder: reported the same way
    assert "not a regular file" in capsys.readouterr().err
    with pytest.raises(FasdiffError, match="not a regular file"):
        codec.read_fsd(str(tmp_path / "x.fsd"))


# Output and stdout failures, injected: no read-only mount or full disk is needed.

def _images(folder, names=("a", "b", "c", "d")):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def loads(monkeypatch):
    """Stands in for load_codec (a codec whose files are b"fsd"); records each model load."""
    calls = []

    def fake_load(args):
        calls.append(args)
        return codec.LoadedCodec("fake", {}, lambda image: b"fsd", lambda data: None)

    monkeypatch.setattr(codec, "load_codec", fake_load)
    return calls


def _oserror(code, filename=None):
    return OSError(code, os.strerror(code), *([filename] if filename else []))


@pytest.mark.parametrize("case", ["read-only", "parent is a file", "ends in a separator"])
def test_an_unwritable_output_is_refused_before_the_model_loads(
        tmp_path, capsys, monkeypatch, loads, case):
    """It was found only after the model loaded and every input was coded (FaSDiff: a
    sampler run per file), then reported once per input with the input's name."""
    import tempfile

    src = _images(tmp_path / "in", ("a", "b"))
    out = tmp_path / "small" / "fsd"
    argv = ["compress", str(src), f"--out_dir={out}", "--model_dir=mbt"]
    if case == "read-only":
        def read_only(*a, **k):
            raise _oserror(errno.EROFS, str(out))

        monkeypatch.setattr(tempfile, "mkstemp", read_only)  # out_dir there or to be made
        monkeypatch.setattr(tempfile, "mkdtemp", read_only)
        want = f"error: {out / 'a.fsd'}: cannot create a file in {out} (Read-only file system)"
    elif case == "parent is a file":
        _touch(tmp_path / "small")
        want = f"error: {out / 'a.fsd'}: {tmp_path / 'small'} is a file, not a folder"
    else:
        argv = ["compress", str(src / "a.png"), f"{tmp_path / 'face.fsd.dir'}{os.sep}",
                "--model_dir=mbt"]
        want = f"error: {tmp_path / 'face.fsd.dir'}{os.sep}: ends in a separator, not a file name"
    assert codec.main(argv) == 2
    out_text, err = capsys.readouterr()
    assert err.splitlines() == [want] and out_text == ""
    assert loads == []  # nothing loaded, nothing coded


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_full_disk_stops_the_run_names_the_output_and_resumes(
        tmp_path, capsys, monkeypatch, loads, code):
    """Every remaining file failed the same way, each blamed on its input."""
    src, out = _images(tmp_path / "in"), tmp_path / "fsd"
    tried = []

    def fills_up(path, content):
        tried.append(path)
        if len(tried) > 2:
            raise _oserror(code)  # as a failed write() says it: no file name
        files.write_atomically(path, content)

    monkeypatch.setattr(codec, "write_atomically", fills_up)
    argv = ["compress", str(src), f"--out_dir={out}", "--model_dir=mbt", "--batch_size=1"]
    assert codec.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {out / 'c.fsd'}: cannot write ({os.strerror(code)})",
                   "stopped: 2 of 4 files written (they stay); rerun with --skip_existing "
                   "to resume"]
    assert len(tried) == 3 and sorted(os.listdir(out)) == ["a.fsd", "b.fsd"]
    monkeypatch.setattr(codec, "write_atomically", files.write_atomically)
    assert codec.main([*argv, "--skip_existing"]) == 0
    assert "compressed 2 of 2 files" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a.fsd", "b.fsd", "c.fsd", "d.fsd"]


def test_an_output_that_cannot_be_written_is_named_and_the_others_still_run(
        tmp_path, capsys, loads):
    src, out = _images(tmp_path / "in", ("a", "b", "c")), tmp_path / "fsd"
    (out / "b.fsd").mkdir(parents=True)  # a folder where the file goes: only this one fails
    argv = ["compress", str(src), f"--out_dir={out}", "--model_dir=mbt"]
    assert codec.main(argv) == 2  # an output there: refused unless --overwrite
    assert capsys.readouterr().err == (f"error: 1 of the outputs exist ({out / 'b.fsd'}): pass "
                                       f"--overwrite to replace them, or --skip_existing to "
                                       f"keep them\n")
    assert codec.main(argv + ["--overwrite"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {out / 'b.fsd'}: cannot write (Is a directory)"]
    assert "compressed 2 of 3 files, 1 failed" in captured.out
    assert sorted(os.listdir(out)) == ["a.fsd", "b.fsd", "c.fsd"]


def test_write_errors_name_the_output_not_the_temporary_file_or_a_bare_errno(tmp_path):
    _touch(tmp_path / "afile")
    dst = str(tmp_path / "afile" / "x.fsd")
    made = FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "afile"))  # os.makedirs
    assert codec.write_error(dst, made) == (
        f"{dst}: cannot write ({tmp_path / 'afile'} is a file, not a folder)")
    tmp = FileNotFoundError(errno.ENOENT, "No such file or directory", f"{dst}.tmp-8115")
    assert codec.write_error(dst, tmp) == f"{dst}: cannot write (No such file or directory)"


class _FailingStdout:
    """A stdout whose every write fails with ``error`` (a reader gone, a full disk)."""

    def __init__(self, error):
        self.error, self.writes = error, 0

    def write(self, text):
        self.writes += 1
        raise self.error

    def flush(self):
        pass


def _fsd_folder(folder, n):
    from fasdiff_jax.coding import container as C

    data = C.pack(C.Container(8, 8, 0, 0, 3, 1, b"f" * 16, (b"ab",)))
    for i in range(n):
        _touch(folder / f"f{i}.fsd", data)
    return folder


@pytest.mark.parametrize("error, status, message", [
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), 141, ""),  # 128 + SIGPIPE, as cat gives
    (_oserror(errno.ENOSPC), 2, "error: stdout: No space left on device\n"),
])
def test_info_stops_at_the_first_stdout_error_and_blames_no_file(
        tmp_path, capsys, monkeypatch, error, status, message):
    """``info many | head -1`` printed one "Broken pipe" error per remaining file, naming it."""
    folder = _fsd_folder(tmp_path / "many", 5)
    stdout = _FailingStdout(error)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert codec.main(["info", str(folder)]) == status
    assert capsys.readouterr().err == message and stdout.writes == 1


def test_compress_stops_quietly_when_its_reader_leaves(tmp_path, capsys, monkeypatch, loads):
    src, out = _images(tmp_path / "in"), tmp_path / "fsd"
    monkeypatch.setattr(sys, "stdout", _FailingStdout(BrokenPipeError(errno.EPIPE, "x")))
    argv = ["compress", str(src), f"--out_dir={out}", "--model_dir=mbt", "--batch_size=1"]
    assert codec.main(argv) == 141
    assert capsys.readouterr().err == "" and os.listdir(out) == ["a.fsd"]


def test_temporary_files_a_killed_run_left_are_removed(tmp_path, capsys, loads):
    """``kill -9`` skips write_atomically's cleanup: each killed run left a NAME.tmp-PID that
    no rerun removed (``--skip_existing`` or not)."""
    from test_files import dead_pid

    src, out = _images(tmp_path / "in", ("a", "b")), tmp_path / "fsd"
    out.mkdir()
    dead = dead_pid()
    for name in (f"a.fsd.tmp-{dead}", f"b.fsd.tmp-{dead}", f"other.fsd.tmp-{dead}"):
        _touch(out / name, b"half")
    assert codec.main(["compress", str(src), f"--out_dir={out}", "--model_dir=mbt"]) == 0
    assert sorted(os.listdir(out)) == ["a.fsd", "b.fsd", f"other.fsd.tmp-{dead}"]  # not ours


def test_ctrl_c_says_what_is_written_and_the_rerun_goes_on(tmp_path, capsys, monkeypatch):
    """A Ctrl-C ended the command with a KeyboardInterrupt traceback."""
    coded = []

    def compress(image):
        coded.append(1)
        if len(coded) == 3:
            raise KeyboardInterrupt
        return b"fsd"

    monkeypatch.setattr(codec, "load_codec",
                        lambda args: codec.LoadedCodec("fake", {}, compress, lambda data: None))
    src, out = _images(tmp_path / "in"), tmp_path / "fsd"
    argv = ["compress", str(src), f"--out_dir={out}", "--model_dir=mbt", "--batch_size=1"]
    assert codec.main(argv) == 130
    assert capsys.readouterr().err == ("interrupted: 2 of 4 files written (they stay); rerun "
                                       "with --skip_existing to go on\n")
    assert sorted(os.listdir(out)) == ["a.fsd", "b.fsd"]
    assert codec.main([*argv, "--skip_existing"]) == 0
    assert sorted(os.listdir(out)) == ["a.fsd", "b.fsd", "c.fsd", "d.fsd"]


    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(codec, "load_codec", interrupted)  # Ctrl-C while the model loads
    assert codec.main(argv + ["--overwrite"]) == 130
    assert capsys.readouterr().err == "interrupted before any file was coded\n"

    def swallowed(args):  # as JAX's gc callback did while it started: the run went on, exit 0
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
        return codec.LoadedCodec("fake", {}, compress, lambda data: None)

    monkeypatch.setattr(codec, "load_codec", swallowed)
    assert codec.main(argv + ["--overwrite"]) == 130
    assert capsys.readouterr().err == "interrupted before any file was coded\n"


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, capsys, monkeypatch):
    """Decompressing into the input folder replaced the original images with their
    reconstructions, exit 0, without a word; any existing output was replaced so."""
    monkeypatch.setattr(codec, "load_codec", lambda args: codec.LoadedCodec(
        "fake", {}, lambda image: b"fsd", lambda data: np.zeros((4, 4, 3), np.uint8)))
    src = _images(tmp_path / "in", ("a", "b"))
    before = {f: (src / f).read_bytes() for f in os.listdir(src)}
    assert codec.main(["compress", str(src), f"--out_dir={src}"]) == 0
    argv = ["decompress", str(src), f"--out_dir={src}"]
    assert codec.main(argv) == 2
    assert capsys.readouterr().err == (f"error: 2 of the outputs exist ({src / 'a.png'}, "
                                       f"{src / 'b.png'}): pass --overwrite to replace them, "
                                       f"or --skip_existing to keep them\n")
    assert all((src / f).read_bytes() == data for f, data in before.items())
    one = ["decompress", str(src / "a.fsd"), str(src / "a.png")]
    assert codec.main(one) == 2
    assert "pass --overwrite to replace them\n" in capsys.readouterr().err
    assert codec.main(one + ["--overwrite"]) == 0 and (src / "a.png").read_bytes() != before[
        "a.png"]
    assert codec.main(argv + ["--skip_existing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # an output folder inside the input folder: its files are not inputs of the next run
    assert codec.main(["compress", str(src), f"--out_dir={src / 'out'}"]) == 0
    assert codec.main(["compress", str(src), f"--out_dir={src / 'out'}", "--skip_existing"]) == 0
    assert sorted(os.listdir(src / "out")) == ["a.fsd", "b.fsd"]


def test_sampler_flags_given_to_decompress_are_said_to_be_ignored(tmp_path, capsys, loads):
    """decompress decodes with the spec in each file's header: --steps and the like were
    ignored without a word (a script may pass compress's flags to both: a warning, no
    refusal)."""
    (tmp_path / "a.fsd").write_bytes(b"x")
    argv = ["decompress", str(tmp_path / "a.fsd"), str(tmp_path / "a.gif"), "--workdir=w",
            "--steps=4", "--seed=1"]  # a GIF output: refused next, before the model loads
    assert codec.main(argv) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "warning: --steps --seed: decompress decodes with the sampler each file was compressed "
        "with (its header); these set compress's and are ignored here")
    assert loads == []
    # ignored, so not refused either where the model has no sampler (a baseline): the warning
    # was followed by "--seed: sampler and SD settings apply to FaSDiff models"
    seen = []
    codec.load_codec = lambda args: seen.append(args) or codec.LoadedCodec(
        "fake", {}, lambda image: b"fsd", lambda data: np.zeros((2, 2, 3), np.uint8))
    assert codec.main(argv[:2] + [str(tmp_path / "a.png"), "--model_dir=mbt", "--seed=1"]) == 0
    assert seen[0].seed is None and seen[0].steps is None


def test_images_that_cannot_be_read_are_one_line_each_and_the_batch_goes_on(
        tmp_path, capsys, monkeypatch, loads):
    """Pillow's TypeError/IndexError on a damaged file (a later frame counted, or a decode)
    stopped the run with a traceback, the batch's good files unwritten; an image over the
    decoders' limit was decoded whole (gigabytes for a 13300x13300 PNG) before being
    refused. Whatever Pillow raises reading one file is that file's one error line; its
    warnings name the file."""
    from PIL import Image

    from fasdiff_jax.data import sources
    from fasdiff_jax.models import hyperprior as H
    from test_data_sources import _damaged_multi_frame, _tiff_with_rational_strip_offsets

    src, out = _images(tmp_path / "in", ("a",)), tmp_path / "fsd"
    _damaged_multi_frame(src)  # pages.tif, anim.gif: their first frames are coded
    _tiff_with_rational_strip_offsets(src / "bad.tif")
    Image.new("RGB", (20, 20)).save(src / "big.png")
    monkeypatch.setattr(H, "MAX_PIXELS", 16 * 16)
    read_image = sources.read_image

    def read_odd(path, *args, **kwargs):
        if path.endswith("a.png"):  # as Pillow warns of a damaged EXIF block, twice
            for _ in range(2):
                warnings.warn("Corrupt EXIF data.  Expecting to read 12 bytes", UserWarning)
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr(sources, "read_image", read_odd)
    assert codec.main(["compress", str(src), f"--out_dir={out}", "--model_dir=mbt"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: {src / 'a.png'}: Corrupt EXIF data. Expecting to read 12 bytes",
        f"error: cannot decode image {src / 'bad.tif'}: corrupt image: TypeError: "
        f"'IFDRational' object cannot be interpreted as an integer",
        f"error: cannot decode image {src / 'big.png'}: image of 20x20 pixels exceeds the "
        f"decoders' limit of 256 pixels; code it in tiles"]
    assert "compressed 3 of 5 files, 2 failed" in captured.out
    assert sorted(os.listdir(out)) == ["a.fsd", "anim.fsd", "pages.fsd"]
