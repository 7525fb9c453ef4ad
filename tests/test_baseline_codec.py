"""The mbt2018-mean baseline end to end: a CompressAI checkpoint -> ``convert
--compressai_checkpoint`` -> ``--model_dir`` in the codec and evaluate commands."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from data_fixtures import embedded_dirs  # noqa: F401 (fixture)
from fasdiff_jax import codec, convert, evaluate
from fasdiff_jax.coding import container
from fasdiff_jax.errors import ConversionError
from fasdiff_jax.models import hyperprior as H
from test_hyperprior import _compressai_state_dict

N, M = 8, 12


def _with_compressai_buffers(sd: dict) -> dict:
    """CompressAI 1.2.8's non-parameter entries of a MeanScaleHyperprior state dict (names
    and shapes as its ``state_dict()`` lists them after ``update()``); the converter skips them."""
    sd = dict(sd)
    sd.update({"entropy_bottleneck.quantiles": np.zeros((N, 1, 3), np.float32),
               "entropy_bottleneck._offset": np.zeros(N, np.int32),
               "entropy_bottleneck._quantized_cdf": np.zeros((N, 23), np.int32),
               "entropy_bottleneck._cdf_length": np.zeros(N, np.int32),
               "entropy_bottleneck.target": np.zeros(3, np.float32),
               "entropy_bottleneck.likelihood_lower_bound.bound": np.ones(1, np.float32),
               "gaussian_conditional._offset": np.zeros(64, np.int32),
               "gaussian_conditional._quantized_cdf": np.zeros((64, 31), np.int32),
               "gaussian_conditional._cdf_length": np.zeros(64, np.int32),
               "gaussian_conditional.scale_table": np.ones(64, np.float32),
               "gaussian_conditional.scale_bound": np.ones(1, np.float32),
               "gaussian_conditional.likelihood_lower_bound.bound": np.ones(1, np.float32),
               "gaussian_conditional.lower_bound_scale.bound": np.ones(1, np.float32)})
    for part in ("g_a", "g_s"):
        for i in (1, 3, 5):
            for rep in ("beta_reparam", "gamma_reparam"):
                sd[f"{part}.{i}.{rep}.pedestal"] = np.ones(1, np.float32)
                sd[f"{part}.{i}.{rep}.lower_bound.bound"] = np.ones(1, np.float32)
    return sd


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """(model_dir, the CompressAI state dict it came from): converted from an .npz."""
    tmp = tmp_path_factory.mktemp("baseline")
    sd = _with_compressai_buffers(_compressai_state_dict(N, M))
    np.savez(tmp / "mbt.npz", **sd)
    assert convert.main(["--compressai_checkpoint", str(tmp / "mbt.npz"), "--out", str(tmp / "mbt")]) == 0
    return tmp / "mbt", sd


def test_converted_folder_holds_exactly_the_compressai_weights(baseline):
    folder, sd = baseline
    model, params = H.load_model(str(folder))
    assert (model.N, model.M, model.hs_activation) == (N, M, "leaky_relu")
    want = H.params_from_compressai(sd)
    got_leaves, got_tree = jax.tree_util.tree_flatten(params)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert got_tree == want_tree
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(g), w)
    img = skdata.astronaut()[100:196, 150:230]
    assert H.compress(model, params, img) == H.compress(model, want, img)


def test_torch_checkpoint_with_training_wrapper_converts(tmp_path, capsys):
    """CompressAI's train script saves {"state_dict": ..., "epoch": ...}; DataParallel adds
    ``module.``; both are undone, and the result equals the .npz route."""
    torch = pytest.importorskip("torch")
    sd = _with_compressai_buffers(_compressai_state_dict(N, M))
    ckpt = {"epoch": 7, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}}
    torch.save(ckpt, tmp_path / "ckpt.pth.tar")
    rc = convert.main(["--compressai_checkpoint", str(tmp_path / "ckpt.pth.tar"),
                       "--out", str(tmp_path / "out")])
    assert rc == 0 and f"N={N} M={M}" in capsys.readouterr().out
    _, params = H.load_model(str(tmp_path / "out"))
    want = H.params_from_compressai(sd)["params"]
    np.testing.assert_array_equal(np.asarray(params["params"]["h_s_4"]["kernel"]), want["h_s_4"]["kernel"])
    np.testing.assert_array_equal(np.asarray(params["params"]["g_s_5"]["gamma"]), want["g_s_5"]["gamma"])
    # a truncated checkpoint is one readable error, not a traceback
    data = (tmp_path / "ckpt.pth.tar").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    rc = convert.main(["--compressai_checkpoint", str(tmp_path / "cut.pth"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "not a readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # a pickle that would run code, and a PNG: refused without torch's advice to load them
    # with weights_only=False (which would run the first one's code)
    torch.save({"state_dict": ckpt["state_dict"], "hook": _RunsCode()}, tmp_path / "code.pth")
    Image.fromarray(skdata.astronaut()).save(tmp_path / "photo.pth", format="PNG")
    for name, reason in (("code.pth", "Unsupported global: GLOBAL print"),
                         ("photo.pth", "Unsupported operand")):
        rc = convert.main(["--compressai_checkpoint", str(tmp_path / name), "--out", str(tmp_path / "o3")])
        out, err = capsys.readouterr()
        assert rc == 2 and reason in err and "refused rather than run" in err, err
        assert "weights_only=False" not in err and "ran" not in out
        assert not (tmp_path / "o3").exists()


def test_compressai_checkpoints_of_older_names_and_dtypes_convert(tmp_path, capsys):
    """Zoo files keep the entropy bottleneck's ``_matrices.0`` (later ``_matrix0``), which
    CompressAI renames when loading: they were refused as another architecture. bfloat16
    tensors were a TypeError traceback, a non-string key an AttributeError."""
    torch = pytest.importorskip("torch")
    sd = _with_compressai_buffers(_compressai_state_dict(N, M))
    want = H.params_from_compressai(sd)["params"]
    zoo = {k.replace("entropy_bottleneck.matrices.", "entropy_bottleneck._matrices.")
            .replace("entropy_bottleneck.biases.", "entropy_bottleneck._biases.")
            .replace("entropy_bottleneck.factors.", "entropy_bottleneck._factors."): v
           for k, v in sd.items()}
    later = {k.replace("entropy_bottleneck._matrices.", "entropy_bottleneck._matrix")
              .replace("entropy_bottleneck._biases.", "entropy_bottleneck._bias")
              .replace("entropy_bottleneck._factors.", "entropy_bottleneck._factor"): v
             for k, v in zoo.items()}
    assert "entropy_bottleneck._matrix0" in later and "entropy_bottleneck._matrices.0" in zoo
    for name, state in (("zoo", zoo), ("later", later)):
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / f"{name}.pth")
        assert convert.main(["--compressai_checkpoint", str(tmp_path / f"{name}.pth"),
                             "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        got = H.load_model(str(tmp_path / name))[1]["params"]["entropy_bottleneck"]
        for k, v in want["entropy_bottleneck"].items():
            np.testing.assert_array_equal(np.asarray(got[k]), v)
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    torch.save(bf16, tmp_path / "bf16.pth")
    assert convert.main(["--compressai_checkpoint", str(tmp_path / "bf16.pth"),
                         "--out", str(tmp_path / "bf16")]) == 0, capsys.readouterr().err
    got = H.load_model(str(tmp_path / "bf16"))[1]["params"]["g_a_0"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got), H.params_from_compressai(
        {k: v.float().numpy() for k, v in bf16.items()})["params"]["g_a_0"]["kernel"])
    torch.save({**{k: torch.from_numpy(v) for k, v in sd.items()}, 0: torch.zeros(1)},
               tmp_path / "intkey.pth")
    assert convert.main(["--compressai_checkpoint", str(tmp_path / "intkey.pth"),
                         "--out", str(tmp_path / "o")]) == 2
    assert "entry 0 is named by a int, not a string" in capsys.readouterr().err
    assert convert.main(["--compressai_checkpoint", str(tmp_path), "--out",
                         str(tmp_path / "o")]) == 2
    assert "a folder, not a checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_conversion_refuses_nan_weights_and_other_folders(tmp_path, capsys):
    """NaN weights converted (exit 0) into a folder the codec then refused; --out onto a
    training workdir replaced its config.json (the run no longer loaded); another model's
    folder was written over. Each refused before anything is written."""
    sd = _with_compressai_buffers(_compressai_state_dict(N, M))
    bad = {**sd, "g_a.0.weight": sd["g_a.0.weight"].copy()}
    bad["g_a.0.weight"][0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **bad)
    np.savez(tmp_path / "ok.npz", **sd)
    out = tmp_path / "out"
    assert convert.main(["--compressai_checkpoint", str(tmp_path / "nan.npz"),
                         "--out", str(out)]) == 2
    assert "non-finite values (NaN or Inf) in the hyperprior's weights: g_a_0/kernel" in \
        capsys.readouterr().err
    assert not out.exists()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"model": {"kind": "hyperprior"}}')
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    for folder, message in ((run, "holds files convert did not write (checkpoints)"),
                            (other, "its config.json is not a MeanScaleHyperprior conversion "
                                    "(_class_name 'UNet2DConditionModel')")):
        before = sorted(p.name for p in folder.iterdir())
        assert convert.main(["--compressai_checkpoint", str(tmp_path / "ok.npz"),
                             "--out", str(folder)]) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == before
    assert convert.main(["--compressai_checkpoint", str(tmp_path / "ok.npz"),
                         "--out", str(out)]) == 0
    assert convert.main(["--compressai_checkpoint", str(tmp_path / "ok.npz"),
                         "--out", str(out)]) == 0  # its own conversion: replaced
    # a scale hyperprior's h_s (same names, other shapes): named as not mbt2018-mean
    scale = {**sd, "h_s.4.weight": np.zeros((M, N, 3, 3), np.float32),
             "h_s.4.bias": np.zeros(M, np.float32)}
    np.savez(tmp_path / "scale.npz", **scale)
    assert convert.main(["--compressai_checkpoint", str(tmp_path / "scale.npz"),
                         "--out", str(tmp_path / "s")]) == 2
    assert "not an mbt2018-mean checkpoint: its tensors have the names but not the shapes" in \
        capsys.readouterr().err


class _RunsCode:
    def __reduce__(self):
        return print, ("ran",)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"context_prediction.weight": np.zeros((2 * M, M, 5, 5), np.float32)}),
     "unexpected ['context_prediction.weight']"),
    (lambda sd: sd.pop("g_s.3.gamma"), "missing ['g_s.3.gamma']"),
    (lambda sd: sd.update({"h_s.4.weight": np.zeros((2 * M, 5, 3, 3), np.float32)}),
     "wrong shape ['h_s_4/kernel']"),
])
def test_other_architectures_are_refused(tmp_path, capsys, change, message):
    """mbt2018 (context model), a missing tensor, a wrong shape: exit 2 naming the tensor."""
    sd = _with_compressai_buffers(_compressai_state_dict(N, M))
    change(sd)
    np.savez(tmp_path / "x.npz", **sd)
    rc = convert.main(["--compressai_checkpoint", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_load_model_refuses_folders_that_do_not_match(baseline, tmp_path):
    folder, _ = baseline
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "params.safetensors").write_bytes((folder / "params.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "M": M + 4}))
    with pytest.raises(ConversionError, match="does not match its config"):
        H.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "channels": 3}))
    with pytest.raises(ConversionError, match="unknown keys"):
        H.load_model(str(tmp_path))
    # a value of the wrong type, or N missing (was: N=128's dozens of wrong shapes), named
    # with the file
    where = re.escape(str(tmp_path / "config.json"))
    for bad, message in (({**cfg, "N": "8"}, r"N='8' \(need an integer >= 1\)"),
                         ({**cfg, "hs_activation": "gelu"}, "hs_activation must be one of"),
                         ({k: v for k, v in cfg.items() if k != "N"}, "config lacks N$")):
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConversionError, match=f"^{where}: .*{message}"):
            H.load_model(str(tmp_path))


def test_codec_command_codes_files_with_the_baseline(baseline, tmp_path, capsys):
    folder, _ = baseline
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(skdata.astronaut()[40:140, 180:300]).save(src / "a.png")  # 100x120 RGB
    gray = skdata.camera()[:70, :90]
    Image.fromarray(gray).save(src / "g.png")  # greyscale files stay greyscale
    Image.fromarray(gray.astype(np.uint16) * 257).save(src / "g16.png")  # 16-bit: mode I;16
    Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA").save(src / "la.png")
    face = skdata.astronaut()[40:140, 180:300]  # an animated GIF: its first frame is coded
    Image.fromarray(face).save(src / "anim.gif", save_all=True,
                               append_images=[Image.fromarray(face[::-1].copy())])
    rc = codec.main(["compress", str(src), f"--out_dir={tmp_path / 'fsd'}", f"--model_dir={folder}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"the first of {src / 'anim.gif'}'s 2 frames" in out
    assert out.count("frames") == 1  # no note for still images
    with Image.open(src / "anim.gif") as im:  # frame 0, as the GIF stores it
        Image.fromarray(np.asarray(im.convert("RGB"))).save(tmp_path / "frame0.png")
    assert codec.main(["compress", str(tmp_path / "frame0.png"), str(tmp_path / "frame0.fsd"),
                       f"--model_dir={folder}"]) == 0
    assert (tmp_path / "frame0.fsd").read_bytes() == (tmp_path / "fsd" / "anim.fsd").read_bytes()
    rc = codec.main(["decompress", str(tmp_path / "fsd"), f"--out_dir={tmp_path / 'png'}",
                     f"--model_dir={folder}"])
    assert rc == 0, capsys.readouterr().err
    model, params = H.load_model(str(folder))
    assert Image.open(src / "g16.png").mode.startswith("I;16")
    decoded = {}
    for name, mode, shape in (("a", "RGB", (100, 120, 3)), ("g", "L", (70, 90)),
                              ("g16", "L", (70, 90)), ("la", "L", (70, 90))):
        data = (tmp_path / "fsd" / f"{name}.fsd").read_bytes()
        assert container.unpack(data).channels == (3 if mode == "RGB" else 1)
        with Image.open(tmp_path / "png" / f"{name}.png") as im:
            assert im.mode == mode
            decoded[name] = out = np.asarray(im)
        assert out.shape == shape
        want = H.decompress(model, params, data)
        np.testing.assert_array_equal(out, want.reshape(out.shape))
    # the same grey pixels however the file stored them: the same file, the same decode
    assert (tmp_path / "fsd" / "g.fsd").read_bytes() == (tmp_path / "fsd" / "g16.fsd").read_bytes()
    np.testing.assert_array_equal(decoded["g"], decoded["la"])
    # another model's weights: its fingerprint does not match, the file is refused
    other = tmp_path / "other"
    H.save_model(str(other), model, H.params_from_compressai(
        _with_compressai_buffers(_compressai_state_dict(N, M, seed=1))))
    rc = codec.main(["decompress", str(tmp_path / "fsd" / "a.fsd"), str(tmp_path / "x.png"),
                     f"--model_dir={other}"])
    assert rc == 2 and "fingerprint" in capsys.readouterr().err


def test_a_hyperprior_folder_with_a_nan_weight_is_refused_by_name(baseline, tmp_path, capsys):
    folder, _ = baseline
    model, params = H.load_model(str(folder))
    bad = jax.tree_util.tree_map(np.array, params["params"])
    bad["entropy_bottleneck"]["bias_0"][0, 0, 0] = np.nan
    H.save_model(str(tmp_path / "nan"), model, {"params": bad})
    Image.fromarray(skdata.astronaut()[:64, :64]).save(tmp_path / "a.png")
    rc = codec.main(["compress", str(tmp_path / "a.png"), str(tmp_path / "a.fsd"),
                     f"--model_dir={tmp_path / 'nan'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / 'nan'}: non-finite values" in err
    assert "entropy_bottleneck/bias_0" in err and not (tmp_path / "a.fsd").exists()
    with pytest.raises(ConversionError, match="entropy_bottleneck/bias_0"):
        H.prepare(model, {"params": bad})  # params handed over in code, not from a folder


def test_decompress_writes_the_decoded_pixels_in_any_format_that_holds_them(
        baseline, tmp_path, capsys):
    """PNG, lossless WebP (Pillow's default WebP is lossy), TIFF, BMP and PPM hold the decoded
    pixels exactly; JPEG is written at quality 95 and says it is lossy; formats that would
    quantise or resize (GIF, ICO) are refused before any model is loaded, nothing written."""
    folder, _ = baseline
    model, params = H.load_model(str(folder))
    rgba = np.dstack([skdata.astronaut()[40:140, 180:300], np.full((100, 120), 255, np.uint8)])
    for name, img in (("rgb", rgba[..., :3]), ("rgba", rgba)):
        (tmp_path / f"{name}.fsd").write_bytes(H.compress(model, params, img))
        want = H.decompress(model, params, (tmp_path / f"{name}.fsd").read_bytes())
        for ext in ("png", "webp", "tif", "bmp", "ppm", "jpg"):
            out = tmp_path / f"{name}.{ext}"
            rc = codec.main(["decompress", str(tmp_path / f"{name}.fsd"), str(out),
                             f"--model_dir={folder}"])
            printed = capsys.readouterr().out
            assert rc == 0 and ("lossy" in printed) == (ext == "jpg"), printed
            with Image.open(out) as im:
                got = np.asarray(im.convert("RGBA" if want.shape[-1] == 4 else "RGB"))
            if ext == "jpg":
                assert evaluate.psnr(want[..., :3], got[..., :3]) > 35
            else:
                np.testing.assert_array_equal(got[..., :3], want[..., :3], err_msg=ext)
    for ext in ("gif", "ico", "xyz"):
        rc = codec.main(["decompress", str(tmp_path / "rgb.fsd"), str(tmp_path / f"o.{ext}"),
                         "--model_dir=/nonexistent"])  # refused before the model is read
        err = capsys.readouterr().err
        assert rc == 2 and "use .png, .webp (lossless)" in err, err
        assert not (tmp_path / f"o.{ext}").exists()


def test_compress_command_reports_an_image_it_cannot_code_and_writes_the_rest(
        baseline, tmp_path, capsys, monkeypatch):
    """An image refused inside a batch (here: larger than the decoders take) is reported by
    name; the other images of its batch are written."""
    folder, _ = baseline
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(skdata.astronaut()[40:140, 180:300]).save(src / "a.png")  # 128x128 padded
    Image.fromarray(skdata.astronaut()[:200, :200]).save(src / "big.png")  # 256x256 padded
    monkeypatch.setattr(H, "MAX_PIXELS", 128 * 128)
    fsd = tmp_path / "fsd"
    assert codec.main(["compress", str(src), f"--out_dir={fsd}", f"--model_dir={folder}",
                       "--batch_size=4"]) == 2
    out, err = capsys.readouterr()
    assert "compressed 1 of 2 files, 1 failed" in out
    assert "big.png" in err and "exceeds the decoders' limit" in err
    assert sorted(p.name for p in fsd.iterdir()) == ["a.fsd"]


def _oom(what: str) -> Exception:
    """The error XLA raises when an allocation fails (its CPU wording)."""
    return jax.errors.JaxRuntimeError(f"INTERNAL: Error dispatching computation: Out of memory "
                                      f"allocating {what} bytes.")


def test_codec_command_codes_a_batch_that_runs_out_of_memory_one_file_at_a_time(
        baseline, tmp_path, capsys, monkeypatch):
    """Device memory for one 128x128 image only (fault injected at the analysis call): the
    batch of two is coded one at a time, byte-identical to coding each alone; the 256x256
    image is reported as out of memory by name and the others are written."""
    folder, _ = baseline
    src = tmp_path / "in"
    src.mkdir()
    for name, crop in (("a", (slice(40, 140), slice(180, 300))),
                       ("b", (slice(0, 100), slice(0, 120))), ("big", (slice(0, 200),) * 2)):
        Image.fromarray(skdata.astronaut()[crop]).save(src / f"{name}.png")
    real = H._encode_device

    def limited(model, params, x):
        if x.size > 128 * 128 * 3:
            raise _oom(str(4 * x.size * 64))
        return real(model, params, x)

    monkeypatch.setattr(H, "_encode_device", limited)
    fsd = tmp_path / "fsd"
    assert codec.main(["compress", str(src), f"--out_dir={fsd}", f"--model_dir={folder}"]) == 2
    out, err = capsys.readouterr()
    assert "compressed 2 of 3 files, 1 failed" in out
    assert err.strip().splitlines() == [
        f"error: {src / 'big.png'}: out of memory coding it (200x200 pixels) on "
        f"{jax.devices()[0].device_kind}"]
    model, params = H.load_model(str(folder))
    for name in ("a", "b"):
        alone = H.compress(model, params, np.asarray(Image.open(src / f"{name}.png")))
        assert (fsd / f"{name}.fsd").read_bytes() == alone
    assert sorted(p.name for p in fsd.iterdir()) == ["a.fsd", "b.fsd"]


def test_evaluate_stops_at_an_image_whose_metrics_run_out_of_memory_and_resumes(
        tmp_path, capsys, monkeypatch):
    """LPIPS / DISTS / identity run on whole images: where one does not fit (fault injected
    for images over 150 px), the command names the image in one line and keeps the rows so
    far; without that image a rerun resumes from them and completes."""
    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(skdata.astronaut()[40:140, 180:300]).save(faces / "a.png")
    Image.fromarray(skdata.astronaut()[:200, :200]).save(faces / "big.png")
    real = evaluate.Metrics.__call__

    def limited(self, a, b):
        if max(a.shape[:2]) > 150:
            raise _oom("30729218500")
        return real(self, a, b)

    monkeypatch.setattr(evaluate.Metrics, "__call__", limited)
    out = tmp_path / "r.json"
    argv = ["--baseline=jpeg:30", f"--source=folder:{faces}", f"--out={out}", "--dists_weights=none"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: big.png (200x200 pixels): out of memory computing its metrics; "
                   "evaluate smaller images (e.g. python -m fasdiff_jax.data.prepare --size) or "
                   "with more memory; the rows so far are kept and a rerun resumes after them"]
    report = json.loads(out.read_text())
    assert [r["image"] for r in report["images"]] == ["a.png"] and not report["complete"]
    first = report["images"][0]
    (faces / "big.png").unlink()
    assert evaluate.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["complete"] and report["images"] == [first]


@pytest.mark.parametrize("flags, message", [
    (["--steps=4"], "sampler and SD settings apply to FaSDiff"),
    (["--sd_checkpoint=/somewhere/sd21"], "--sd_checkpoint: sampler and SD settings apply"),
    (["--config=configs/tiny.py"], "not both"),
    (["--step=3"], "not both"),
    (["--model_dir=/nonexistent/mbt"], "not a hyperprior folder (make one with"),
    ([], "give --workdir (a FaSDiff training workdir), or --model_dir"),
])
def test_model_flags_are_checked_before_any_work(baseline, tmp_path, capsys, flags, message):
    folder, _ = baseline
    model_flag = [f"--model_dir={folder}"] if flags and "--model_dir" not in flags[0] else []
    Image.fromarray(skdata.astronaut()[:64, :64]).save(tmp_path / "a.png")
    rc = codec.main(["compress", str(tmp_path / "a.png"), str(tmp_path / "a.fsd"), *model_flag, *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "a.fsd").exists()


def test_evaluate_command_measures_the_baseline(baseline, tmp_path, capsys):
    """File-size bpp and the same metrics as FaSDiff; the settings name the weights."""
    folder, _ = baseline
    faces = tmp_path / "faces"
    faces.mkdir()
    crops = {"a.png": skdata.astronaut()[0:128, 150:278], "b.png": skdata.astronaut()[60:188, 120:248]}
    for name, img in crops.items():
        Image.fromarray(img).save(faces / name)
    out = tmp_path / "mbt.json"
    rc = evaluate.main(["--model_dir", str(folder), "--source", f"folder:{faces}", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["name"] == "mbt2018-mean" and report["complete"] is True
    model, params = H.load_model(str(folder))
    assert report["settings"]["fingerprint"] == H.prepare(model, params).fingerprint.hex()
    assert report["settings"]["model"]["M"] == M
    rows = {r["image"]: r for r in report["images"]}
    for name, img in crops.items():
        data = H.compress(model, params, img)
        assert rows[name]["bytes"] == len(data)
        assert rows[name]["bpp"] == pytest.approx(8 * len(data) / (128 * 128))
        assert rows[name]["psnr-rgb"] == pytest.approx(
            evaluate.psnr(img, H.decompress(model, params, data)), abs=1e-9)
        assert 0 <= rows[name]["lpips"]
    # a.png shows part of a face dlib does not find: no identity (nor landmarks) for it
    assert rows["a.png"]["face-detected"] is None and rows["a.png"]["identity-cos"] is None
    assert rows["b.png"]["face-detected"] in (0, 1) and -1 <= rows["b.png"]["identity-cos"] <= 1


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_evaluate_command_measures_pillow_anchors(tmp_path, capsys, fmt, pil_format):
    """``--baseline jpeg:Q`` / ``webp:Q``: the file is Pillow's encoding at that quality,
    bpp from its size, a lower quality gives fewer bytes and a lower PSNR."""
    import io

    faces = tmp_path / "faces"
    faces.mkdir()
    img = skdata.astronaut()[0:128, 150:278]
    Image.fromarray(img).save(faces / "a.png")
    reports = {}
    for q in (20, 80):
        out = tmp_path / f"{fmt}{q}.json"
        rc = evaluate.main([f"--baseline={fmt}:{q}", f"--source=folder:{faces}", f"--out={out}"])
        assert rc == 0, capsys.readouterr().err
        reports[q] = json.loads(out.read_text())
        row = reports[q]["images"][0]
        assert reports[q]["name"] == f"{fmt}-q{q}" and reports[q]["settings"]["baseline"] == f"{fmt}:{q}"
        data = evaluate.pillow_codec(f"{fmt}:{q}").compress(img)
        assert Image.open(io.BytesIO(data)).format == pil_format
        assert row["bytes"] == len(data) and row["bpp"] == pytest.approx(8 * len(data) / 128**2)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert row["psnr-rgb"] == pytest.approx(evaluate.psnr(img, decoded), abs=1e-9)
    lo, hi = reports[20]["images"][0], reports[80]["images"][0]
    assert lo["bytes"] < hi["bytes"] and lo["psnr-rgb"] < hi["psnr-rgb"] < 60


@pytest.mark.parametrize("flag", ["--limit=0", "--limit=-1", "--batch_size=0"])
def test_evaluate_refuses_counts_below_one(tmp_path, capsys, flag):
    """``--limit=0`` used to write an empty report marked complete; now a usage error
    before anything is read or written."""
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--baseline=jpeg:30", f"--source=folder:{tmp_path}", f"--out={out}", flag])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_reports_lpips_vgg_on_request(tmp_path, capsys):
    """``--lpips_vgg``: LPIPS with the VGG16 backbone beside AlexNet's, equal to the module
    applied directly; the settings say so, so a run resumes only with the same choice."""
    import jax.numpy as jnp

    from fasdiff_jax.models import perceptual

    faces = tmp_path / "faces"
    faces.mkdir()
    img = skdata.astronaut()[0:128, 150:278]
    Image.fromarray(img).save(faces / "a.png")
    base = ["--baseline=jpeg:20", f"--source=folder:{faces}", "--dists_weights=none"]
    out = tmp_path / "v.json"
    assert evaluate.main(base + [f"--out={out}", "--lpips_vgg"]) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["settings"]["lpips_vgg"] is True
    codec = evaluate.pillow_codec("jpeg:20")
    decoded = codec.decompress(codec.compress(img))
    module, params = perceptual.load_lpips("vgg16")
    want = module.apply({"params": params}, *(jnp.asarray(v[None] / 127.5 - 1.0, jnp.float32)
                                               for v in (img, decoded)))
    row = report["images"][0]
    assert row["lpips-vgg"] == pytest.approx(float(want[0]), rel=1e-4)
    assert row["lpips-vgg"] > 0.05 and row["lpips-vgg"] != pytest.approx(row["lpips"], rel=0.05)
    capsys.readouterr()
    assert evaluate.main(base + [f"--out={out}"]) == 2  # the rows have lpips-vgg: refused
    assert "(lpips_vgg, lpips_vgg_weights_sha256 differ)" in capsys.readouterr().err
    assert evaluate.main(base + [f"--out={tmp_path / 'n.json'}"]) == 0
    plain = json.loads((tmp_path / "n.json").read_text())
    assert "lpips-vgg" not in plain["results"] and "lpips_vgg" not in plain["settings"]


def test_evaluate_reports_dists_when_its_weights_are_there(tmp_path, capsys, monkeypatch):
    """DISTS with the installed DISTS_pytorch weights (the settings name them by hash, so a
    run resumes only with the same), left out with a note where they are not installed, or
    with --dists_weights=none; a named file that is not there is refused."""
    import hashlib

    import jax.numpy as jnp

    from fasdiff_jax.models import perceptual

    faces = tmp_path / "faces"
    faces.mkdir()
    img = skdata.astronaut()[0:128, 150:278]
    Image.fromarray(img).save(faces / "a.png")
    base = ["--baseline=jpeg:20", f"--source=folder:{faces}"]
    out = tmp_path / "j.json"
    assert evaluate.main(base + [f"--out={out}"]) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    weights = perceptual.dists_weights_path()
    assert report["settings"]["dists_weights_sha256"] == hashlib.sha256(
        open(weights, "rb").read()).hexdigest()
    assert report["settings"]["dists_vgg_weights_sha256"] == hashlib.sha256(  # its backbone
        open(perceptual.weights_path("vgg16"), "rb").read()).hexdigest()
    decoded = evaluate.pillow_codec("jpeg:20").decompress(evaluate.pillow_codec("jpeg:20").compress(img))
    module, params = perceptual.load_dists()
    want = module.apply({"params": params}, *(jnp.asarray(v[None] / 255.0, jnp.float32)
                                               for v in (img, decoded)))
    assert report["images"][0]["dists"] == pytest.approx(float(want[0]), rel=1e-4)
    assert report["results"]["dists"] > 0.05

    capsys.readouterr()
    assert evaluate.main(base + [f"--out={out}", "--dists_weights=none"]) == 2
    assert "dists_weights_sha256 differ" in capsys.readouterr().err
    assert evaluate.main(base + [f"--out={tmp_path / 'n.json'}", "--dists_weights=none"]) == 0
    assert "dists" not in json.loads((tmp_path / "n.json").read_text())["results"]
    assert evaluate.main(base + ["--dists_weights=/nonexistent/weights.pt"]) == 2
    assert "no such file" in capsys.readouterr().err
    monkeypatch.setattr(perceptual, "dists_weights_path", lambda: None)  # not installed
    assert evaluate.main(base + [f"--out={tmp_path / 'm.json'}"]) == 0
    assert "DISTS left out" in capsys.readouterr().err
    missing = json.loads((tmp_path / "m.json").read_text())
    assert "dists" not in missing["results"] and "dists_weights_sha256" not in missing["settings"]
    assert "dists_vgg_weights_sha256" not in missing["settings"]


@pytest.mark.parametrize("argv, message", [
    (["--baseline=jpeg:0"], "quality must be in 1..95"),
    (["--baseline=png:3"], "expected jpeg:Q or webp:Q"),
    (["--baseline=jpeg:30", "--model_dir=x"], "drop --model_dir"),
])
def test_pillow_anchor_flags_are_checked(capsys, argv, message):
    assert evaluate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_evaluate_takes_the_whole_embedded_heldout_set(embedded_dirs, tmp_path, capsys):  # noqa: F811
    """All 9 held-out records, four crops of one photo among them: unique names, the same on
    a rerun (which then finds every row done). Was: 'appears twice' after 2 images."""
    out = tmp_path / "jpeg.json"
    argv = ["--baseline=jpeg:30", f"--source=prepared:{embedded_dirs['heldout']}", f"--out={out}"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    names = [r["image"] for r in report["images"]]
    assert len(names) == 9 == len(set(names)) and report["complete"]
    assert "skimage/camera.png" in names and "skimage/camera.png#2" in names
    assert evaluate.main(argv) == 0
    assert json.loads(out.read_text())["images"] == report["images"]


def test_info_command_reads_headers_without_a_model(baseline, tmp_path, capsys):
    folder, _ = baseline
    model, params = H.load_model(str(folder))
    data = H.compress(model, params, skdata.astronaut()[:70, :90])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.fsd").write_bytes(data)
    (tmp_path / "f" / "cut.fsd").write_bytes(data[:-5])
    assert codec.main(["info", str(tmp_path / "f")]) == 2  # one bad file: reported, exit 2
    out, err = capsys.readouterr()
    info = json.loads(out.strip())
    assert info["codec"] == "mbt2018-mean" and (info["height"], info["width"]) == (70, 90)
    assert info["fingerprint"] == H.prepare(model, params).fingerprint.hex()
    assert info["bytes"] == len(data) == info["header_bytes"] + sum(info["stream_bytes"]) == 66 + sum(
        info["stream_bytes"])
    assert (info["pad_bottom"], info["pad_right"]) == (58, 38) and "sampler" not in info
    assert "cut.fsd" in err and "checksum mismatch" in err
