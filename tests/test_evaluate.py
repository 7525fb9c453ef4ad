"""Evaluation: bpp from real file bytes, PSNR/LPIPS/identity on decoded images, JSON-ready."""

import json
import os
import time

import numpy as np
import pytest
from skimage import data as skdata

from data_fixtures import embedded_dirs  # noqa: F401 (fixture)
from fasdiff_jax import evaluate, files
from fasdiff_jax.errors import DataError
from fasdiff_jax.models import identity as identity_lib


@pytest.fixture(scope="module")
def faces():
    face = skdata.astronaut()[30:222, 150:342]  # 192x192 real face
    return [("astronaut", face), ("astronaut_small", face[::2, ::2].copy())]


def _raw_codec(img: np.ndarray) -> bytes:
    return np.asarray(img.shape, np.uint16).tobytes() + img.tobytes()


def _raw_decode(data: bytes) -> np.ndarray:
    shape = tuple(np.frombuffer(data[:6], np.uint16))
    return np.frombuffer(data[6:], np.uint8).reshape(shape)


def test_lossless_and_lossy_codecs(faces):
    metrics = evaluate.Metrics()
    exact = evaluate.evaluate(_raw_codec, _raw_decode, faces, metrics, name="raw")
    for row, (_, img) in zip(exact["images"], faces):
        assert row["bytes"] == img.size + 6
        assert row["bpp"] == pytest.approx(8 * (img.size + 6) / (img.shape[0] * img.shape[1]))
        assert row["psnr-rgb"] == evaluate.PSNR_MAX_DB  # the cap: JSON has no Infinity
        assert row["lpips"] == pytest.approx(0, abs=1e-6)
        assert row["identity-cos"] == pytest.approx(1.0, abs=1e-5)
        assert row["dists"] == pytest.approx(0, abs=1e-5)
        assert row["face-detected"] == 1.0 and row["landmark-nme"] == 0.0
    # MS-SSIM: 1 for the 192 px face; undefined (null) for the 96 px one, left out of the mean
    assert [row["ms-ssim-rgb"] for row in exact["images"]] == [pytest.approx(1.0), None]
    assert exact["results"]["ms-ssim-rgb"] == pytest.approx(1.0)

    def coarse(img):  # 8 grey levels per channel: visibly worse, same size
        return _raw_codec((img // 32) * 32 + 16)

    lossy = evaluate.evaluate(coarse, _raw_decode, faces, metrics, name="coarse")
    r = lossy["results"]
    assert 20 < r["psnr-rgb"] < 40 and r["lpips"] > 0.01 and 0.8 < r["identity-cos"] < 1.0
    assert 0.02 < r["dists"] < 0.5
    assert 0.5 < r["ms-ssim-rgb"] < 0.99 and lossy["images"][1]["ms-ssim-rgb"] is None
    assert r["ms-ssim-rgb"] == lossy["images"][0]["ms-ssim-rgb"]  # the mean of those with one
    json.dumps(lossy)  # serialisable as is
    assert set(r) >= {"bpp", "bytes", "psnr-rgb", "ms-ssim-rgb", "lpips", "dists",
                      "identity-cos", "face-detected", "landmark-nme", "encoding_time",
                      "decoding_time"}


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def test_face_analysis_detection_and_landmark_error(faces):
    """dlib on the original and the reconstruction: the landmark error as 300-W defines it
    (computed here straight from dlib's API), growing with the damage; detection lost at JPEG
    quality 5 and under heavy blur; None where the original shows no face, left out of the means."""
    import dlib
    from PIL import Image, ImageFilter

    from fasdiff_jax.data.align import landmark_model_path

    face = np.ascontiguousarray(faces[0][1])
    detector, predictor = dlib.get_frontal_face_detector(), dlib.shape_predictor(landmark_model_path())

    def points(img, rect):
        s = predictor(np.ascontiguousarray(img), rect)
        return np.array([(s.part(i).x, s.part(i).y) for i in range(68)], np.float64)

    rect = max(detector(face, 1), key=lambda r: r.area())
    ref = points(face, rect)
    blurred = np.asarray(Image.fromarray(face).filter(ImageFilter.GaussianBlur(8)))
    nme = {}
    for name, recon in (("q30", _jpeg(face, 30)), ("q10", _jpeg(face, 10)), ("q5", _jpeg(face, 5)),
                        ("blur", blurred)):
        got = evaluate.face_analysis(face, recon)
        want = np.linalg.norm(points(recon, rect) - ref, axis=1).mean() / np.linalg.norm(ref[36] - ref[45])
        assert got["landmark-nme"] == pytest.approx(want, rel=1e-12), name
        nme[name] = got["landmark-nme"]
        assert got["face-detected"] == (1.0 if name in ("q30", "q10") else 0.0), name
    assert 0 < nme["q30"] < nme["q5"] < nme["blur"] < 0.2
    assert evaluate.face_analysis(face, face) == {"face-detected": 1.0, "landmark-nme": 0.0}
    coffee = skdata.coffee()
    assert evaluate.face_analysis(coffee, coffee) == {"face-detected": None, "landmark-nme": None}
    report = evaluate._report("x", [{"landmark-nme": 0.1}, {"landmark-nme": None},
                                    {"landmark-nme": 0.3}])
    assert report["results"]["landmark-nme"] == pytest.approx(0.2)


@pytest.mark.parametrize("box", [(0, 256, 100, 356), (10, 181, 50, 253), (0, 161, 0, 161),
                                 (33, 230, 0, 512)])
def test_ms_ssim_matches_pytorch_msssim(box):
    """MS-SSIM equals pytorch_msssim's ``ms_ssim`` (what CompressAI's eval_model reports) on
    8-bit images, JPEG-distorted, even and odd sizes (its zero-padded pooling), 161 px (the
    smallest defined). To 1e-12 with the same float64 window; to 5e-6 with the reference's
    default window, computed in float32."""
    import torch
    from pytorch_msssim import ms_ssim as reference

    t, b, l, r = box
    a = np.ascontiguousarray(skdata.astronaut()[t:b, l:r])
    distorted = _jpeg(a, 15)
    ours = evaluate.ms_ssim(a, distorted)

    def nchw(x):
        return torch.from_numpy(x.astype(np.float64)).permute(2, 0, 1)[None]

    window = torch.from_numpy(evaluate._gaussian_window())[None, None].repeat(3, 1, 1, 1)
    assert ours == pytest.approx(reference(nchw(a), nchw(distorted), data_range=255,
                                           win=window).item(), abs=1e-12)
    assert ours == pytest.approx(reference(nchw(a), nchw(distorted), data_range=255).item(),
                                 abs=5e-6)
    assert 0.8 < ours < 1 and evaluate.ms_ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert evaluate.ms_ssim(a, _jpeg(a, 5)) < ours  # worse JPEG, lower MS-SSIM
    assert evaluate.ms_ssim(a[:160], distorted[:160]) is None  # below 161 px: undefined


def test_an_interrupted_evaluation_goes_on_where_it_stopped(faces, tmp_path):
    """``done`` rows are kept as they are and their images not coded again; ``on_row`` sees
    the report after every new image (the command saves it there)."""
    three = faces + [("astronaut_flipped", faces[0][1][:, ::-1].copy())]
    coded, saved = [], []

    def codec(img):
        coded.append(img.shape)
        if len(coded) == 2 and not saved[1:]:
            raise KeyboardInterrupt  # the run dies on its second image
        return _raw_codec((img // 32) * 32 + 16)

    metrics = evaluate.Metrics()
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(codec, _raw_decode, three, metrics, name="q", on_row=saved.append)
    assert [len(r["images"]) for r in saved] == [1]
    coded.clear()
    done = {r["image"]: r for r in saved[-1]["images"]}
    out = evaluate.evaluate(codec, _raw_decode, three, metrics, name="q", done=done,
                            on_row=saved.append)
    assert len(coded) == 2 and [len(r["images"]) for r in saved] == [1, 2, 3]
    assert out["images"][0] is done["astronaut"]  # kept, not recomputed
    fresh = evaluate.evaluate(lambda im: _raw_codec((im // 32) * 32 + 16), _raw_decode, three,
                              metrics, name="q")
    for a, b in zip(out["images"], fresh["images"]):
        assert {k: v for k, v in a.items() if "time" not in k} == pytest.approx(
            {k: v for k, v in b.items() if "time" not in k})
    with pytest.raises(ValueError, match="appears twice"):
        evaluate.evaluate(codec, _raw_decode, three + three[:1], metrics, done=done)


def test_batched_coding_gives_the_same_rows_in_order(faces):
    """``batch_size`` with a codec's ``compress_many`` and ``decompress_many``: that many
    images compressed together and decoded together; rows as one at a time (times aside),
    kept rows of an interrupted run in their place, each time a share of its batch; an
    image's or a file's error is raised."""
    four = faces + [(f"{n}_flipped", im[:, ::-1].copy()) for n, im in faces]
    calls = []

    def coarse(img):
        return _raw_codec((img // 32) * 32 + 16)

    def compress_many(images):
        calls.append(("compress", len(images)))
        return [coarse(im) for im in images]

    def many(datas):
        calls.append(("decompress", len(datas)))
        return [_raw_decode(d) for d in datas]

    metrics = evaluate.Metrics()
    alone = evaluate.evaluate(coarse, _raw_decode, four, metrics, name="q")
    done = {"astronaut_small": alone["images"][1]}
    batched = evaluate.evaluate(coarse, _raw_decode, four, metrics, name="q", done=done,
                                decompress_many=many, batch_size=2, compress_many=compress_many)
    # the first image alone (a kept row follows it), then two together
    assert calls == [("compress", 1), ("decompress", 1), ("compress", 2), ("decompress", 2)]
    assert [r["image"] for r in batched["images"]] == [r["image"] for r in alone["images"]]
    assert batched["images"][1] is done["astronaut_small"]
    for a, b in zip(alone["images"], batched["images"]):
        assert {k: v for k, v in a.items() if "time" not in k} == pytest.approx(
            {k: v for k, v in b.items() if "time" not in k})
    for key in ("encoding_time", "decoding_time"):
        assert batched["images"][2][key] == batched["images"][3][key]

    def failing(datas):
        return [ValueError("damaged file")] + [_raw_decode(d) for d in datas[1:]]

    with pytest.raises(ValueError, match="damaged file"):
        evaluate.evaluate(coarse, _raw_decode, four, metrics, decompress_many=failing,
                          batch_size=4)

    def bad_image(images):
        return [coarse(im) for im in images[:-1]] + [TypeError("expected a uint8 image")]

    with pytest.raises(TypeError, match="uint8"):
        evaluate.evaluate(coarse, _raw_decode, four, metrics, compress_many=bad_image,
                          batch_size=4)


def test_resume_rows_takes_only_a_run_of_the_same_settings(tmp_path, capsys):
    from fasdiff_jax.errors import FasdiffError

    path = tmp_path / "r.json"
    settings = {"config": "c.py", "checkpoint_step": 6, "sampler": {"steps": 2, "eta": 0.0}}
    assert evaluate.resume_rows(str(path), settings) == {}
    path.write_text(json.dumps({"name": "x", "images": [{"image": "a", "bpp": 1.0}],
                                "settings": settings, "complete": False}))
    assert evaluate.resume_rows(str(path), settings) == {"a": {"image": "a", "bpp": 1.0}}
    with pytest.raises(FasdiffError, match=r"other settings \(sampler differ\)"):
        evaluate.resume_rows(str(path), {**settings, "sampler": {"steps": 3, "eta": 0.0}})
    # a file written before image_size, weights' sha256 and versions were recorded resumes;
    # where both have them they count (versions: a warning only)
    now = {**settings, "image_size": None, "identity_weights_sha256": "ab",
           "versions": {"jax": "0.10.2"}}
    assert evaluate.resume_rows(str(path), now) == {"a": {"image": "a", "bpp": 1.0}}
    path.write_text(json.dumps({"name": "x", "images": [], "settings": now, "complete": False}))
    with pytest.raises(FasdiffError, match=r"other settings \(identity_weights_sha256 differ"):
        evaluate.resume_rows(str(path), {**now, "identity_weights_sha256": "cd"})
    capsys.readouterr()
    assert evaluate.resume_rows(str(path), {**now, "versions": {"jax": "0.11.0"}}) == {}
    assert capsys.readouterr().err == (f"warning: {path}: its rows were made with other "
                                       f"package versions (jax 0.10.2 -> 0.11.0); the rerun "
                                       f"goes on with these\n")
    # the same model read from another place (a model folder copied or moved): it resumes,
    # said; another model there does not
    here = {"model_dir": "/a/mbt", "fingerprint": "f0", "source": "/faces"}
    path.write_text(json.dumps({"name": "x", "images": [{"image": "a", "bpp": 1.0}],
                                "settings": here, "complete": False}))
    capsys.readouterr()
    assert evaluate.resume_rows(str(path), {**here, "model_dir": "/b/mbt"}) == {
        "a": {"image": "a", "bpp": 1.0}}
    assert capsys.readouterr().err == (f"warning: {path}: the same model (fingerprint f0) read "
                                       f"from another place (model_dir /a/mbt -> /b/mbt)\n")
    with pytest.raises(FasdiffError, match=r"other settings \(fingerprint, model_dir differ"):
        evaluate.resume_rows(str(path), {**here, "model_dir": "/b/mbt", "fingerprint": "f1"})
    # a workdir moved with its own config.json resumes; another config file does not (the
    # fingerprint leaves out what it may change: compute dtype, attention)
    run = {"workdir": "/a/run", "config": "/a/run/config.json", "fingerprint": "f0"}
    path.write_text(json.dumps({"name": "x", "images": [], "settings": run, "complete": False}))
    assert evaluate.resume_rows(str(path), {**run, "workdir": "/b/run",
                                            "config": "/b/run/config.json"}) == {}
    with pytest.raises(FasdiffError, match=r"other settings \(config differ"):
        evaluate.resume_rows(str(path), {**run, "config": "/a/bf16.py"})
    path.write_text("{not json")
    with pytest.raises(FasdiffError, match="not an evaluate JSON"):
        evaluate.resume_rows(str(path), settings)


def test_bd_rate_refuses_unfinished_runs(tmp_path, capsys):
    runs = [{"name": f"r{i}", "results": {"bpp": b, "psnr-rgb": q}, "images": [{}],
             "complete": True} for i, (b, q) in enumerate([(0.1, 30), (0.2, 32), (0.4, 34)])]
    files = []
    for i, run in enumerate(runs + [{**runs[2], "complete": False}]):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(run))
    args = ["bd-rate", "--metric=psnr-rgb", "--anchor", *map(str, files[:3]), "--test"]
    assert evaluate.main(args + [str(f) for f in files[:3]]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["psnr-rgb"]["bd_rate_percent"] == (
        pytest.approx(0.0, abs=1e-9))
    assert evaluate.main(args + [str(f) for f in (files[0], files[1], files[3])]) == 2
    assert "unfinished evaluation" in capsys.readouterr().err


def test_bd_rate_reads_compressai_results_as_its_rate_points(tmp_path, capsys):
    """CompressAI's eval_model JSON keeps one list entry per rate point under ``results``."""
    bpp, psnr_ = [0.1, 0.2, 0.4, 0.8], [30.0, 32.0, 34.0, 36.0]
    cai = {"name": "mbt2018-mean-mse", "description": "Inference (ans)",
           "results": {"psnr-rgb": psnr_, "ms-ssim-rgb": [0.9, 0.93, 0.95, 0.97], "bpp": bpp,
                       "encoding_time": [0.1] * 4, "decoding_time": [0.1] * 4}}
    ours = [{"name": f"fasdiff@{i}", "results": {"bpp": 0.9 * b, "psnr-rgb": q,
                                                 "ms-ssim-rgb": None},  # images < 161 px
             "images": [{}], "complete": True} for i, (b, q) in enumerate(zip(bpp, psnr_))]
    report = evaluate.bd_report([cai], ours, ("psnr-rgb", "ms-ssim-rgb"))
    assert report["anchor"] == [f"mbt2018-mean-mse[{i}]" for i in range(4)]
    assert report["metrics"]["psnr-rgb"]["bd_rate_percent"] == pytest.approx(-10.0, abs=1e-9)
    assert "ms-ssim-rgb" not in report["metrics"]  # ours has no MS-SSIM value: skipped
    (tmp_path / "cai.json").write_text(json.dumps(cai))
    (tmp_path / "bad.json").write_text(json.dumps({**cai, "results": {**cai["results"],
                                                                       "bpp": bpp[:3]}}))
    assert evaluate.main(["bd-rate", "--anchor", str(tmp_path / "bad.json"),
                          "--test", str(tmp_path / "cai.json")]) == 2
    assert "lists of different lengths" in capsys.readouterr().err


def test_aligned_face_chips_box():
    import jax.numpy as jnp

    img = jnp.zeros((1, 100, 100, 3)).at[:, 20:90, 15:85].set(1.0)  # box 17.5..92.5 x 12.5..87.5
    chips = np.asarray(identity_lib.aligned_face_chips(img, (0.2, 0.15, 0.7)))
    assert chips.shape == (1, 150, 150, 3)
    assert np.allclose(chips, 255.0)  # the box lies inside the white square
    with pytest.raises(AssertionError, match="decoded"):
        evaluate.evaluate(_raw_codec, lambda d: _raw_decode(d)[:5], [("x", np.zeros((8, 8, 3),
                                                                    np.uint8))], object())


# --------------------------------------------------------------------------------------------
# Bjontegaard deltas
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", evaluate.BD_METHODS)
def test_bd_rate_matches_the_bjontegaard_package(method):
    bj = pytest.importorskip("bjontegaard")
    # the example curves of the package's README, then random monotone curves
    curves = [([9487.76, 4593.60, 2486.44, 1358.24], [40.037, 38.615, 37.425, 36.347],
               [9787.80, 4469.00, 2451.52, 1356.24], [40.121, 38.651, 37.511, 36.429])]
    rng = np.random.default_rng(0)
    for _ in range(5):
        curves.append(tuple(np.sort(rng.uniform(lo, hi, 5)) for lo, hi in
                            ((0.05, 1.0), (28, 36), (0.05, 1.0), (28, 36))))
    for ra, qa, rb, qb in curves:
        assert evaluate.bd_rate(ra, qa, rb, qb, method) == pytest.approx(
            bj.bd_rate(ra, qa, rb, qb, method=method, min_overlap=0), rel=1e-9)
        assert evaluate.bd_quality(ra, qa, rb, qb, method) == pytest.approx(
            bj.bd_psnr(ra, qa, rb, qb, method=method, min_overlap=0), rel=1e-9)
    # a lower-is-better metric (LPIPS): the package needs it negated; the rate delta is the same
    ra, qa, rb, qb = [0.1, 0.2, 0.4, 0.8], [0.5, 0.4, 0.3, 0.2], [0.09, 0.2, 0.35, 0.7], [0.48, 0.37, 0.29, 0.21]
    neg = lambda q: [-v for v in q]  # noqa: E731
    assert evaluate.bd_rate(ra, qa, rb, qb, method) == pytest.approx(
        bj.bd_rate(ra, neg(qa), rb, neg(qb), method=method, min_overlap=0), rel=1e-9)
    assert evaluate.bd_quality(ra, qa, rb, qb, method) == pytest.approx(
        -bj.bd_psnr(ra, neg(qa), rb, neg(qb), method=method, min_overlap=0), rel=1e-9)


@pytest.mark.parametrize("method", evaluate.BD_METHODS)
def test_bd_rate_exact_cases(method):
    r, q = [0.1, 0.2, 0.4, 0.8], [30.0, 32.0, 34.0, 36.0]
    assert evaluate.bd_rate(r, q, [x / 2 for x in r], q, method) == pytest.approx(-50.0, abs=1e-9)
    assert evaluate.bd_rate(r, q, [x * 1.2 for x in r], q, method) == pytest.approx(20.0, abs=1e-9)
    # log-linear curves 1 dB apart, sampled at different rates: 10**-0.1 - 1 of the rate
    ra = np.array([0.05, 0.1, 0.3, 0.6, 1.0])
    rb = np.array([0.07, 0.15, 0.25, 0.5, 0.9])
    qa, qb = 10 * np.log10(ra) + 30, 10 * np.log10(rb) + 31
    assert evaluate.bd_rate(ra, qa, rb, qb, method) == pytest.approx(100 * (10**-0.1 - 1), abs=1e-9)
    assert evaluate.bd_quality(ra, qa, rb, qb, method) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("bad, msg", [
    (dict(ra=[0.1, 0.2, 0.4]), "needs >= 4"),
    (dict(ra=[0.1, 0.0, 0.4, 0.8]), "positive"),
    (dict(qa=[30.0, 30.0, 34.0, 36.0]), "distinct"),
    (dict(qb=[40.0, 41.0, 42.0, 43.0]), "do not overlap"),
    (dict(qa=[30.0, float("nan"), 34.0, 36.0]), "finite"),
])
def test_bd_rate_bad_curves_raise_value_error(bad, msg):
    c = dict(ra=[0.1, 0.2, 0.4, 0.8], qa=[30.0, 32.0, 34.0, 36.0], rb=[0.1, 0.2, 0.4, 0.8],
             qb=[30.5, 32.5, 34.5, 36.5])
    c.update(bad)
    with pytest.raises(ValueError, match=msg):
        evaluate.bd_rate(c["ra"], c["qa"], c["rb"], c["qb"], "cubic")
    with pytest.raises(ValueError, match="method"):
        evaluate.bd_rate(c["ra"], c["qa"], c["rb"], c["qb"], "akima")


def test_bd_rate_command_reads_evaluate_jsons(tmp_path, capsys):
    def run(name, bpp, psnr_db, lp):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "results": {
            "bpp": bpp, "psnr-rgb": psnr_db, "lpips": lp, "identity-cos": float("inf")}}))
        return str(path)

    rates = [0.1, 0.2, 0.4, 0.8]
    anchor = [run(f"a{i}", r, 30 + 2 * i, 0.5 - 0.1 * i) for i, r in enumerate(rates)]
    test = [run(f"b{i}", r / 2, 30 + 2 * i, 0.5 - 0.1 * i) for i, r in enumerate(rates)]
    assert evaluate.main(["bd-rate", "--anchor", *anchor, "--test", *test]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["anchor"] == ["a0", "a1", "a2", "a3"] and out["method"] == "pchip"
    assert out["metrics"]["psnr-rgb"]["bd_rate_percent"] == pytest.approx(-50.0)
    assert out["metrics"]["lpips"]["bd_rate_percent"] == pytest.approx(-50.0)
    assert out["metrics"]["psnr-rgb"]["bd_quality"] > 0  # better PSNR at equal rate
    assert "identity-cos" not in out["metrics"]  # not finite in these runs: skipped


def test_images_from_source_names_repeated_keys_by_index():
    img = np.zeros((4, 4, 3), np.uint8)
    source = [{"key": "a.png", "image": img}, {"key": "b.png", "image": img},
              {"key": "a.png", "image": img}, {"image": img}]
    assert [n for n, _ in evaluate.images_from_source(source)] == ["a.png", "b.png", "a.png#2", "3"]
    assert [n for n, _ in evaluate.images_from_source(source, limit=2)] == ["a.png", "b.png"]


def test_source_names_of_a_prepared_set_read_no_image(embedded_dirs, monkeypatch):  # noqa: F811
    """A resumed run with --limit lists the names of the whole source: a prepared set's from
    its records' metadata (it decoded every image, ~2 ms each at 256 px)."""
    from fasdiff_jax.data import sources

    src = sources.open_prepared(embedded_dirs["heldout"])
    want = [n for n, _ in evaluate.images_from_source(src)]
    assert len(want) == len(src) > 1 and len(set(want)) == len(want)
    full = src[1]
    del full["image"]
    assert src.meta(1) == full and "key" in full
    monkeypatch.setattr(sources, "decode_record", lambda data: pytest.fail("decoded"))
    assert evaluate.source_names(src) == want


def test_pillows_warnings_on_a_source_image_name_the_image(capsys):
    """They named Pillow's source line ("TiffImagePlugin.py:949: UserWarning: Corrupt EXIF
    data"), not the image; now one line per distinct warning with the image's name."""
    import warnings

    class Warns(list):
        def __getitem__(self, i):
            if i == 1:
                for _ in range(2):
                    warnings.warn("Corrupt EXIF data.\n  Expecting 12 bytes", UserWarning)
            return super().__getitem__(i)

    img = np.zeros((4, 4, 3), np.uint8)
    source = Warns([{"key": "a.png", "image": img}, {"key": "b.tif", "image": img}])
    assert [n for n, _ in evaluate.images_from_source(source)] == ["a.png", "b.tif"]
    assert capsys.readouterr().err == "warning: b.tif: Corrupt EXIF data. Expecting 12 bytes\n"


# --------------------------------------------------------------------------------------------
# The commands' handling of bad input: one "error:" line naming the file, exit status 2
# --------------------------------------------------------------------------------------------
def _bd_runs(tmp_path, prefix, rates, quality, **extra):
    paths = []
    for i, (b, q) in enumerate(zip(rates, quality)):
        paths.append(tmp_path / f"{prefix}{i}.json")
        paths[-1].write_text(json.dumps({"name": f"{prefix}{i}", "results": {
            "bpp": b, "psnr-rgb": q, "lpips": 1 / q}, "images": [], "complete": True, **extra}))
    return [str(p) for p in paths]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("content, msg", [
    ("[1, 2]", "not an evaluate JSON (the top level is a list, not an object)"),
    ('{"name": "n"}', "not an evaluate JSON (no 'results')"),
    ('{"results": "abc"}', "not an evaluate JSON ('results' is a str, not an object)"),
    ('{"results": {"psnr-rgb": 30}}', "not an evaluate JSON (no 'bpp' in 'results')"),
    ('{"results": {"bpp": "0.1", "psnr-rgb": 30}}', "'results'.'bpp' holds '0.1', not a number"),
    ('{"results": {"bpp": 0.1, "psnr-rgb": "30"}}',
     "'results'.'psnr-rgb' holds '30', not a number"),
    ('{"results": {"bpp": 0.0, "psnr-rgb": 20}}', "'bpp' is 0.0; rates must be positive"),
    ('{"results": {"bpp": NaN, "psnr-rgb": 20}}', "'bpp' is nan; rates must be positive"),
    ('{"results": {"bpp": 0.3, "psnr-rgb": 30}, "complete": false}',
     "an unfinished evaluation (rerun its evaluate command"),
    ('{"results": {"bpp": [], "psnr-rgb": []}}', "'results'.'bpp' is an empty list"),
    ('{"results": {"bpp": [0.1, 0.2], "psnr-rgb": 3}}',
     "'results'.'psnr-rgb' is 3, not a list as its 'bpp'"),
    ('{"results": {"bpp": [0.1, 0.2], "psnr-rgb": [25, 28, 30]}}',
     "lists of different lengths: bpp 2, psnr-rgb 3"),
    ('{"name": "x", "results": {', "not an evaluate JSON (not JSON: Expecting property name"),
    ("", "not an evaluate JSON (not JSON: Expecting value"),
])
def test_bd_rate_command_names_the_file_and_field_of_a_bad_json(tmp_path, capsys, content, msg):
    good = _bd_runs(tmp_path, "a", [0.1, 0.2], [25.0, 28.0])
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert evaluate.main(["bd-rate", "--anchor", good[0], str(bad), "--test", *good]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: {bad}: ") and msg in err, err


def test_bd_rate_command_names_a_missing_file_and_a_too_short_curve(tmp_path, capsys):
    good = _bd_runs(tmp_path, "a", [0.1, 0.2], [25.0, 28.0])
    missing = str(tmp_path / "missing.json")
    assert evaluate.main(["bd-rate", "--anchor", missing, "--test", *good]) == 2
    assert _one_error_line(capsys) == f"error: {missing}: cannot read (No such file or directory)\n"
    assert evaluate.main(["bd-rate", "--anchor", good[0], "--test", *good]) == 2
    assert _one_error_line(capsys) == (f"error: psnr-rgb, anchor curve ({good[0]}): pchip needs "
                                       f">= 2 (rate, quality) points per curve, got 1\n")


def test_bd_rate_refuses_unknown_metrics_and_reports_none_computable(tmp_path, capsys):
    anchor = _bd_runs(tmp_path, "a", [0.1, 0.2, 0.4], [25.0, 28.0, 31.0])
    test = _bd_runs(tmp_path, "b", [0.09, 0.18, 0.35], [25.5, 28.4, 31.2])
    args = ["bd-rate", "--anchor", *anchor, "--test", *test]
    assert evaluate.main(args + ["--metric=psnr"]) == 2
    assert _one_error_line(capsys) == ("error: unknown metric 'psnr'; known: psnr-rgb, "
                                       "ms-ssim-rgb, lpips, lpips-vgg, dists, identity-cos, "
                                       "landmark-nme\n")
    assert evaluate.main(args + ["--metric=dists"]) == 2  # no file has DISTS
    err = _one_error_line(capsys)
    assert err.startswith("error: no metric asked for can be computed from these files: dists: "
                          f"missing or not finite in {anchor[0]}, "), err
    # one of two computable: the other's absence is said, the result given
    assert evaluate.main(args + ["--metric=dists", "--metric=lpips"]) == 0
    captured = capsys.readouterr()
    assert list(json.loads(captured.out)["metrics"]) == ["lpips"]
    assert captured.err.startswith("warning: dists skipped: missing or not finite in ")
    with pytest.raises(DataError, match="unknown metric 'PSNR'"):
        evaluate.bd_report([{"results": {"bpp": 0.1}}], [{"results": {"bpp": 0.1}}], ["PSNR"])


def test_bd_rate_warns_of_runs_evaluated_differently_and_non_monotonic_curves(tmp_path, capsys):
    """Not refused (a comparison across sources may be meant), but said on stderr."""
    rows = [{"image": "x.png"}, {"image": "y.png"}]
    anchor = _bd_runs(tmp_path, "a", [0.1, 0.2, 0.4, 0.8], [25.0, 35.0, 30.0, 34.0],
                      settings={"baseline": "jpeg:10", "source": "folder:faces"})
    test = _bd_runs(tmp_path, "b", [0.09, 0.18, 0.35, 0.7], [25.5, 28.4, 31.2, 34.5],
                    settings={"baseline": "webp:10", "source": "embedded:heldout"})
    for p in test[:1]:  # one test run on fewer images
        run = json.loads(open(p).read())
        open(p, "w").write(json.dumps({**run, "images": rows[:1]}))
    for p in anchor + test[1:]:
        run = json.loads(open(p).read())
        open(p, "w").write(json.dumps({**run, "images": rows}))
    args = ["bd-rate", "--metric=psnr-rgb", "--anchor", *anchor, "--test", *test]
    assert evaluate.main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "psnr-rgb" in report["metrics"]
    warnings = captured.err.splitlines()
    assert warnings == [f"warning: {w}" for w in report["warnings"]] and len(warnings) == 3
    assert warnings[0].startswith("warning: the runs differ in their settings' 'source' (source): "
                                  f'"folder:faces" in {anchor[0]}, ')
    assert f'"embedded:heldout" in {test[0]}, {test[1]}' in warnings[0]
    assert warnings[1] == (f"warning: the runs were evaluated on different images (2 images in "
                           f"{', '.join(anchor + test[1:])}; 1 images in {test[0]}; 1 in common)")
    assert warnings[2] == ("warning: psnr-rgb is not monotonic in rate on the anchor curve "
                           "(psnr-rgb 25, 35, 30, 34 at bpp 0.1, 0.2, 0.4, 0.8); its BD values "
                           "mislead")
    # the same settings and images, monotonic curves: no warning
    same = _bd_runs(tmp_path, "c", [0.1, 0.2, 0.4, 0.8], [25.0, 28.0, 31.0, 34.0])
    assert evaluate.main(["bd-rate", "--anchor", *same, "--test", *same]) == 0
    assert capsys.readouterr().err == ""


class _PsnrOnly:
    """Stands for :class:`evaluate.Metrics` where the test needs no network."""

    def __init__(self, **_):
        pass

    def __call__(self, orig, recon):
        return {"psnr-rgb": evaluate.psnr(orig, recon)}


def _face_folder(path, names):
    from PIL import Image

    path.mkdir()
    face = skdata.astronaut()[30:94, 150:214]
    for i, name in enumerate(names):
        Image.fromarray(np.roll(face, 7 * i, axis=1)).save(path / name)
    return str(path)


def test_evaluate_refuses_a_folder_image_over_the_codecs_limit_before_decoding(tmp_path,
                                                                              capsys):
    """A small PNG asking for 10000x10000 pixels was decoded (~300 MB) before the codec's
    2^24-pixel limit refused it; now the folder's opening names it and nothing is written."""
    from data_fixtures import png_header_only

    src = _face_folder(tmp_path / "faces", ["a.png"])
    (tmp_path / "faces" / "huge.png").write_bytes(png_header_only(10000, 10000))
    out = tmp_path / "jpeg.json"
    assert evaluate.main(["--baseline=jpeg:50", f"--source={src}", "--dists_weights=none",
                          f"--out={out}"]) == 2
    err = _one_error_line(capsys)
    assert ("huge.png: image of 10000x10000 pixels exceeds the decoders' limit of 16777216 "
            "pixels") in err, err
    assert not out.exists()

def test_evaluate_rerun_never_drops_rows_it_holds(tmp_path, capsys, monkeypatch):
    """A rerun with a smaller --limit (or over a source that lost images) would rewrite --out
    without the rows it does not cover: refused, the file kept as it was (or, for rows of
    images gone, kept in the file, which stays unfinished)."""
    monkeypatch.setattr(evaluate, "Metrics", _PsnrOnly)
    src = _face_folder(tmp_path / "faces", ["a.png", "b.png"])
    out = tmp_path / "jpeg.json"
    args = ["--baseline=jpeg:50", f"--source={src}", "--dists_weights=none", f"--out={out}"]
    assert evaluate.main(args) == 0
    before = out.read_text()
    assert [r["image"] for r in json.loads(before)["images"]] == ["a.png", "b.png"]
    assert evaluate.main(args + ["--limit=1"]) == 2
    assert _one_error_line(capsys) == (
        f"error: {out} already holds 2 images of this run, more than --limit=1 of the 2 images "
        f"of {src} this one covers; its rows are not dropped: raise --limit, or choose another "
        f"--out\n")
    assert out.read_text() == before
    assert evaluate.main(args + ["--limit=2"]) == 0 and out.read_text() == before  # all kept
    # a.png replaced by c.png: c coded, a's row kept (last), the file left unfinished
    (tmp_path / "faces" / "a.png").rename(tmp_path / "faces" / "c.png")
    assert evaluate.main(args) == 2
    assert _one_error_line(capsys) == (
        f"error: {out} holds rows of images {src} no longer yields (a.png); they are kept and "
        f"the file left unfinished: choose another --out\n")
    saved = json.loads(out.read_text())
    assert [r["image"] for r in saved["images"]] == ["b.png", "c.png", "a.png"]
    assert saved["complete"] is False


@pytest.mark.parametrize("where, msg", [
    ("file.png/x.json", "{tmp}/file.png is a file, not a folder"),
    ("file.png/sub/x.json", "{tmp}/file.png is a file, not a folder"),
    ("folder", None),
])
def test_evaluate_refuses_an_unwritable_out_before_any_work(tmp_path, capsys, monkeypatch,
                                                             where, msg):
    def no_work(*_):
        raise AssertionError("the codec was made before --out was checked")

    monkeypatch.setattr(evaluate, "pillow_codec", no_work)
    (tmp_path / "file.png").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    out = tmp_path / where
    assert evaluate.main(["--baseline=jpeg:50", f"--out={out}"]) == 2
    want = (f"{out} is a folder, not a file" if msg is None else
            f"{out}: " + msg.format(tmp=tmp_path))
    assert _one_error_line(capsys) == f"error: --out {want}\n"


def test_check_writable_probes_missing_folders_and_leaves_nothing(tmp_path):
    """Missing folders were made by the check: a run that then failed (its model did not
    load) left them empty. The first write makes them."""
    out = tmp_path / "new" / "sub" / "x.json"
    files.check_writable(str(out))
    assert list(tmp_path.iterdir()) == []
    files.write_atomically(str(out), b"{}")
    files.check_writable(str(out))
    assert [p.name for p in out.parent.iterdir()] == ["x.json"]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(DataError, match="cannot create a file in"):
            files.check_writable(str(tmp_path / "ro" / "new" / "x.json"))
    if os.path.isdir("/proc/self"):  # no file can be made there, even by root
        with pytest.raises(DataError, match=r"^--out /proc/x.json: cannot create a "
                                                     r"file in /proc \("):
            files.check_writable("/proc/x.json")


def test_ctrl_c_keeps_the_rows_done_and_the_rerun_goes_on(tmp_path, capsys, monkeypatch):
    """A Ctrl-C ended evaluate with a KeyboardInterrupt traceback; the rows saved stay and
    the same command goes on from them."""
    seen = []

    class StopsAtTheSecond(_PsnrOnly):
        def __call__(self, orig, recon):
            seen.append(1)
            if len(seen) == 2:
                raise KeyboardInterrupt
            return super().__call__(orig, recon)

    monkeypatch.setattr(evaluate, "Metrics", StopsAtTheSecond)
    src = _face_folder(tmp_path / "faces", ["a.png", "b.png", "c.png"])
    out = tmp_path / "jpeg.json"
    args = ["--baseline=jpeg:50", f"--source={src}", "--dists_weights=none", f"--out={out}",
            "--batch_size=1"]
    assert evaluate.main(args) == 130
    assert capsys.readouterr().err == (f"interrupted; the rows done are saved in {out}: rerun "
                                       f"the same command to go on\n")
    saved = json.loads(out.read_text())
    assert [r["image"] for r in saved["images"]] == ["a.png"] and saved["complete"] is False
    assert evaluate.main(args) == 0
    assert [r["image"] for r in json.loads(out.read_text())["images"]] == ["a.png", "b.png",
                                                                          "c.png"]


# --------------------------------------------------------------------------------------------
# Standard JSON, recorded settings, robust times, bd-rate's checks (none needs a network)
# --------------------------------------------------------------------------------------------
def _strict_json(text: str):
    """JSON as strict parsers (node's JSON.parse) read it: no Infinity or NaN."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_an_exact_reconstruction_gives_capped_psnr_in_standard_json(tmp_path, monkeypatch):
    """A flat grey image survives JPEG q95 exactly: its PSNR was Infinity in the file (which
    strict parsers reject) and the mean infinite. The settings say what made the numbers."""
    from PIL import Image

    from fasdiff_jax.models import perceptual

    monkeypatch.setattr(evaluate, "Metrics", _PsnrOnly)
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "flat" / "grey.png")
    out = tmp_path / "flat.json"
    assert evaluate.main(["--baseline=jpeg:95", f"--source={tmp_path / 'flat'}",
                          "--dists_weights=none", f"--out={out}"]) == 0
    run = _strict_json(out.read_text())
    assert run["images"][0]["psnr-rgb"] == run["results"]["psnr-rgb"] == 100.0
    settings = run["settings"]
    assert settings["image_size"] is None  # a folder's images are coded at their own size
    import jax
    import PIL

    assert settings["versions"]["jax"] == jax.__version__
    assert settings["versions"]["Pillow"] == PIL.__version__
    assert settings["versions"]["fasdiff-jax"] and settings["versions"]["flax"]
    assert settings["lpips_weights_sha256"] == files.file_sha256(perceptual.weights_path())
    assert settings["identity_weights_sha256"] == files.file_sha256(
        identity_lib.default_model_path())
    # any other non-finite number is written as null
    assert _strict_json(evaluate.json_text({"a": [float("nan"), 1.5], "b": -float("inf")})) == {
        "a": [None, 1.5], "b": None}


def test_embedded_source_records_the_size_it_is_built_at():
    """A model's embedded source is built at its image_size, a baseline's at 256 px."""
    assert evaluate.source_image_size("embedded:heldout", {"image_size": 64}) == 64
    assert evaluate.source_image_size("embedded", {}) == 256
    assert evaluate.source_image_size("folder:faces", {"image_size": 64}) is None


def test_summary_times_leave_out_the_first_images_compilation():
    """The first call of a jitted codec compiles (2.4 s against 0.013 s): the mean of the
    times was 20 times the steady one. Per-image times stay as measured; the summary is
    their median."""
    calls = []

    def decode(data):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)  # compiling
        return _raw_decode(data)

    images = [(f"im{i}", np.full((8, 8, 3), i, np.uint8)) for i in range(5)]
    out = evaluate.evaluate(_raw_codec, decode, images, _PsnrOnly(), name="raw")
    times = [r["decoding_time"] for r in out["images"]]
    assert times[0] >= 0.3 and out["results"]["decoding_time"] == np.median(times) < 0.3
    assert out["results"]["psnr-rgb"] == 100.0


def test_identity_needs_a_face_in_the_original_and_stays_in_range(monkeypatch):
    """identity-cos was averaged over non-face images, and float32 gave 1.0000001."""
    import jax.numpy as jnp

    metrics = evaluate.Metrics(dists="none")
    # stand-ins for the networks and dlib (loading and compiling them takes seconds; they
    # are tested above): a face wherever the image is not black
    metrics._lp = lambda p, a, b: np.zeros(1)
    metrics._id = lambda p, x: jnp.ones((1, 128))
    monkeypatch.setattr(identity_lib, "identity_cosine", lambda a, b: np.array([1.0000001]))
    monkeypatch.setattr(evaluate, "face_analysis", lambda orig, recon: (
        {"face-detected": 1.0, "landmark-nme": 0.0} if orig.any() else
        {"face-detected": None, "landmark-nme": None}))
    face, black = np.full((64, 64, 3), 99, np.uint8), np.zeros((64, 64, 3), np.uint8)
    assert metrics(face, face)["identity-cos"] == 1.0
    assert metrics(black, black)["identity-cos"] is None


def _curve_runs(tmp_path, prefix, rates, quality, metric="psnr-rgb", size=None):
    paths = []
    for i, (b, q) in enumerate(zip(rates, quality)):
        rows = [{"image": "x.png"} if size is None else
                {"image": "x.png", "height": size, "width": size}]
        paths.append(tmp_path / f"{prefix}{i}.json")
        paths[-1].write_text(json.dumps({"name": f"{prefix}{i}", "results": {
            "bpp": b, metric: q}, "images": rows, "complete": True}))
    return [str(p) for p in paths]


def test_bd_rate_warns_of_runs_of_other_image_sizes_and_lists_its_files(tmp_path, capsys):
    """The tiny model codes the embedded set at 64 px, a baseline at 256 px: bpp and
    quality of the two do not compare."""
    anchor = _curve_runs(tmp_path, "a", [0.2, 0.4], [30.0, 34.0], size=256)
    test = _curve_runs(tmp_path, "b", [0.1, 0.3], [29.0, 35.0], size=64)
    assert evaluate.main(["bd-rate", "--anchor", *anchor, "--test", *test]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: the runs coded images of different sizes (256x256 in "
                            f"{', '.join(anchor)}; 64x64 in {', '.join(test)}): their bpp and "
                            f"quality do not compare\n")
    assert _strict_json(captured.out)["files"] == {"anchor": anchor, "test": test}


def test_bd_rate_warns_of_a_curve_that_gets_worse_with_rate(tmp_path, capsys):
    """landmark-nme (lower is better) fell with JPEG's rate and rose with WebP's: BD-rate
    -20.6 % was given without a word."""
    anchor = _curve_runs(tmp_path, "jpeg", [0.2, 0.5, 1.0], [0.08, 0.05, 0.03], "landmark-nme")
    test = _curve_runs(tmp_path, "webp", [0.2, 0.5, 1.0], [0.03, 0.05, 0.07], "landmark-nme")
    assert evaluate.main(["bd-rate", "--anchor", *anchor, "--test", *test]) == 0
    assert capsys.readouterr().err == (
        "warning: landmark-nme gets worse as rate rises on the test curve (0.03 at bpp 0.2, "
        "0.07 at bpp 1; lower is better); its BD values mislead\n")


def test_bd_rate_of_rates_too_far_apart_is_an_error_line(tmp_path, capsys):
    """Rates 1e-300 against 1e300 overflowed 10 ** x: an OverflowError traceback."""
    anchor = _curve_runs(tmp_path, "e", [1e-300, 2e-300], [30.0, 40.0])
    test = _curve_runs(tmp_path, "f", [1e300, 2e300], [30.0, 40.0])
    assert evaluate.main(["bd-rate", "--anchor", *anchor, "--test", *test]) == 2
    assert "too far apart for a BD-rate" in _one_error_line(capsys)


def test_help_names_the_bd_rate_command_and_the_json_units(capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "python -m fasdiff_jax.evaluate bd-rate --anchor" in out
    assert "seconds" in out and "capped at 100 dB" in out and "8 * file bytes" in out


# --------------------------------------------------------------------------------------------
# Audit fixes: LPIPS's smallest side, compile-free medians, partial BD values, absolute
# sources, Ctrl-C before any row, --limit past new files, MS-SSIM memory, animated files
# --------------------------------------------------------------------------------------------
def test_lpips_below_its_smallest_side_is_null_with_a_warning_and_counted(monkeypatch, capsys):
    """AlexNet's LPIPS is NaN below 31 px (a feature map is empty): it became null without a
    word, and the mean then covered fewer images than bpp's."""
    metrics = evaluate.Metrics(dists="none")
    for side, defined in ((30, False), (31, True)):  # the limit, measured
        grey, light = (np.full((1, side, 64, 3), v, np.float32) for v in (-0.2, 0.1))
        assert np.isfinite(metrics._lp(metrics.lpips_params, grey, light)[0]) == defined
    assert evaluate.LPIPS_MIN_SIDE["lpips"] == 31
    metrics._lp = lambda p, a, b: np.full(1, 0.25)  # the network's value, any size
    monkeypatch.setattr(evaluate, "face_analysis", lambda orig, recon: (
        {"face-detected": None, "landmark-nme": None}))
    rng = np.random.default_rng(0)
    images = [("big.png", rng.integers(0, 256, (31, 40, 3), np.uint8)),
              ("strip.png", rng.integers(0, 256, (30, 64, 3), np.uint8))]
    out = evaluate.evaluate(_raw_codec, _raw_decode, images, metrics)
    assert [r["lpips"] for r in out["images"]] == [0.25, None]
    assert capsys.readouterr().err == ("warning: strip.png: 30x64 px, under the smallest side "
                                       "of lpips (31 px): null, left out of the mean\n")
    assert out["results"]["lpips"] == 0.25 and out["counts"]["lpips"] == 1
    assert "psnr-rgb" not in out["counts"] and "bpp" not in out["counts"]


def test_bd_rate_warns_where_a_metric_covers_fewer_images_than_bpp(tmp_path, capsys):
    """bd-rate paired a mean bpp over 3 images with a mean LPIPS over 2, silently."""
    def run(name, bpp, lp, small_lpips):
        rows = [{"image": f"{i}.png", "bpp": bpp, "lpips": None if small_lpips and i == 2
                 else lp} for i in range(3)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**evaluate._report(name, rows), "complete": True}))
        return str(path)

    anchor = [run("a0", 0.2, 0.4, False), run("a1", 0.4, 0.3, False)]
    test = [run("b0", 0.1, 0.4, True), run("b1", 0.3, 0.3, False)]
    old = json.loads(open(test[0]).read())
    del old["counts"]  # a file from before "counts": its rows say it
    open(test[0], "w").write(json.dumps(old))
    assert evaluate.main(["bd-rate", "--anchor", *anchor, "--test", *test]) == 0
    assert capsys.readouterr().err == (
        f"warning: lpips's mean covers fewer images than bpp's ({test[0]} 2 of 3): its BD "
        f"values pair rate and quality of different images\n")


def test_summary_medians_leave_out_rows_whose_batch_compiled():
    """With --batch_size=8 the first batch's compilation, shared over its rows, was the
    median (0.089 s against 0.0027 s). Rows whose call compiled a program are marked and
    left out of the medians; the per-row times stay as measured."""
    import jax

    double = jax.jit(lambda x: x * 2)

    def decompress_many(datas):
        time.sleep(0.05)  # the coding itself, the same in every batch
        return list(np.asarray(double(np.stack([_raw_decode(d) for d in datas]))) // 2)

    images = [(f"im{i}", np.full((8, 8, 3), 10 + i, np.uint8)) for i in range(5)]
    out = evaluate.evaluate(_raw_codec, _raw_decode, images, _PsnrOnly(), batch_size=2,
                            compress_many=lambda ims: [_raw_codec(im) for im in ims],
                            decompress_many=decompress_many)
    # batches of 2, 2, 1: the first and the last (a new shape) compile
    assert [r.get("compiled") for r in out["images"]] == [
        ["decoding_time"], ["decoding_time"], None, None, ["decoding_time"]]
    times = [r["decoding_time"] for r in out["images"]]
    assert out["results"]["decoding_time"] == np.median(times[2:4])
    assert out["counts"] == {"decoding_time": 2}
    assert out["results"]["encoding_time"] == np.median(
        [r["encoding_time"] for r in out["images"]])  # nothing compiled there
    assert "compiled" not in out["results"]


def test_bd_rate_gives_the_value_whose_axis_overlaps(tmp_path, capsys):
    """Rate ranges apart but quality ranges overlapping: BD-rate is computable, BD-quality
    not; the command refused both ("do not overlap (common range [0.2628, 0.2444])")."""
    anchor = _curve_runs(tmp_path, "a", [0.1, 0.2, 0.4], [30.0, 32.0, 34.0])
    test = _curve_runs(tmp_path, "b", [0.5, 0.7, 0.9], [31.0, 33.0, 35.0])
    assert evaluate.main(["bd-rate", "--anchor", *anchor, "--test", *test]) == 0
    captured = capsys.readouterr()
    values = json.loads(captured.out)["metrics"]["psnr-rgb"]
    assert values["bd_quality"] is None and values["bd_rate_percent"] > 100
    assert captured.err == (
        "warning: psnr-rgb: bd_quality is null: the two curves do not overlap in log10 bpp "
        "(anchor [-1, -0.3979], test [-0.301, -0.04576])\n")
    with pytest.raises(ValueError, match=r"do not overlap in quality \(anchor \[30, 34\]"):
        evaluate.bd_rate([0.1, 0.2, 0.4], [30.0, 32.0, 34.0], [0.1, 0.2], [35.0, 36.0])


def test_a_relative_source_is_recorded_absolute(tmp_path, capsys, monkeypatch):
    """A relative --source was recorded as typed: the same command run from another folder
    merged that folder's rows into the file (exit 0, complete). Files recording a relative
    source still resume where it names the same folder from here, with a warning."""
    monkeypatch.setattr(evaluate, "Metrics", _PsnrOnly)
    for where in ("A", "B"):
        (tmp_path / where).mkdir()
        _face_folder(tmp_path / where / "faces", ["a.png"])
    out = tmp_path / "jpeg.json"
    args = ["--baseline=jpeg:50", "--source=faces", "--dists_weights=none", f"--out={out}"]
    monkeypatch.chdir(tmp_path / "A")
    assert evaluate.main(args) == 0
    saved = json.loads(out.read_text())
    assert saved["settings"]["source"] == str(tmp_path / "A" / "faces")
    assert evaluate.source_setting("folder:faces") == f"folder:{tmp_path / 'A' / 'faces'}"
    assert evaluate.source_setting("embedded:heldout") == "embedded:heldout"
    monkeypatch.chdir(tmp_path / "B")
    assert evaluate.main(args) == 2
    assert "other settings (source differ)" in _one_error_line(capsys)
    saved["settings"]["source"] = "faces"  # as files from before this recorded it
    out.write_text(json.dumps(saved))
    assert evaluate.main(args) == 0  # B/faces from here: taken, said
    assert "records its source as 'faces', relative" in capsys.readouterr().err
    assert json.loads(out.read_text())["settings"]["source"] == str(tmp_path / "B" / "faces")


def test_ctrl_c_before_the_first_row_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    """It said "the rows done are saved in X.json", a file that did not exist."""
    class StopsAtOnce(_PsnrOnly):
        def __call__(self, orig, recon):
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "Metrics", StopsAtOnce)
    src = _face_folder(tmp_path / "faces", ["a.png"])
    out = tmp_path / "jpeg.json"
    assert evaluate.main(["--baseline=jpeg:50", f"--source={src}", "--dists_weights=none",
                          f"--out={out}"]) == 130
    assert capsys.readouterr().err == (f"interrupted before the first image was done; nothing "
                                       f"was written to {out}\n")
    assert not out.exists()


def test_a_limit_past_rows_of_the_file_is_not_images_gone(tmp_path, capsys, monkeypatch):
    """A new file sorting first pushed a row past --limit: "holds rows of images ... no
    longer yields (c.png)", and the file was left unfinished. Now refused before any work."""
    monkeypatch.setattr(evaluate, "Metrics", _PsnrOnly)
    src = _face_folder(tmp_path / "faces", ["b.png", "c.png"])
    out = tmp_path / "jpeg.json"
    args = ["--baseline=jpeg:50", f"--source={src}", "--dists_weights=none", f"--out={out}"]
    assert evaluate.main(args + ["--limit=2"]) == 0
    before = out.read_text()
    (tmp_path / "faces" / "c.png").rename(tmp_path / "faces" / "a.png")
    _face_folder(tmp_path / "more", ["c.png"])
    (tmp_path / "more" / "c.png").rename(tmp_path / "faces" / "c.png")
    assert evaluate.main(args + ["--limit=2"]) == 2
    assert _one_error_line(capsys) == (
        f"error: {out} holds rows of images {src} yields after its first --limit=2 (c.png); "
        f"its rows are not dropped: raise --limit to 3, or choose another --out\n")
    assert out.read_text() == before
    assert evaluate.main(args + ["--limit=3"]) == 0
    saved = json.loads(out.read_text())
    assert [r["image"] for r in saved["images"]] == ["a.png", "b.png", "c.png"]
    assert saved["complete"] is True


def test_ms_ssim_holds_little_memory():
    """The five moments of all channels, stacked, peaked at 6.7 GB for a 4000x4000 image
    (52 times its float64 plane); one channel and moment at a time: 8 times."""
    import tracemalloc

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (400, 400, 3), np.uint8)
    b = np.clip(a + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    tracemalloc.start()
    try:
        evaluate.ms_ssim(a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * 400 * 400 * 8


def test_host_out_of_memory_is_one_error_line(tmp_path, capsys, monkeypatch):
    """A MemoryError (MS-SSIM of a large image under a memory limit) ended in a traceback;
    only the device's was turned into the one-line error naming the image."""
    class NoMemory(_PsnrOnly):
        def __call__(self, orig, recon):
            raise MemoryError()

    monkeypatch.setattr(evaluate, "Metrics", NoMemory)
    src = _face_folder(tmp_path / "faces", ["a.png"])
    assert evaluate.main(["--baseline=jpeg:50", f"--source={src}", "--dists_weights=none"]) == 2
    assert _one_error_line(capsys) == (
        f"error: a.png (64x64 pixels): out of host memory computing its metrics; "
        f"{evaluate._OOM_ADVICE}\n")


def test_an_animated_file_is_evaluated_by_its_first_frame_with_a_note(tmp_path, capsys,
                                                                      monkeypatch):
    """As codec compress says "(the first of X's N frames ...)", evaluate said nothing."""
    from PIL import Image

    monkeypatch.setattr(evaluate, "Metrics", _PsnrOnly)
    (tmp_path / "faces").mkdir()
    face = skdata.astronaut()[30:94, 150:214]
    frames = [Image.fromarray(face), Image.fromarray(face[::-1].copy())]
    frames[0].save(tmp_path / "faces" / "anim.gif", save_all=True, append_images=frames[1:])
    assert evaluate.main(["--baseline=jpeg:50", f"--source={tmp_path / 'faces'}",
                          "--dists_weights=none"]) == 0
    assert capsys.readouterr().err == ("note: anim.gif: the first of its 2 frames is evaluated: "
                                       "the codec codes still images\n")
