"""``fasdiff_jax.codec``'s command line without a model: batch jobs, refusals, atomic writes.
(The commands on a trained model: ``test_train.py``.)"""

from __future__ import annotations

import os

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
