"""dlib face-recognition ResNet in Flax vs dlib itself, on real faces shipped by packages.

Faces: skimage's astronaut (Eileen Collins) and matplotlib's grace_hopper.jpg, plus their JPEG
q50 versions. Everything runs through one jitted forward (batch 4) and one jitted gradient, so
the whole file compiles the network twice.
"""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

dlib = pytest.importorskip("dlib", reason="parity tests need dlib (`pip install dlib-bin`)")

from fasdiff_jax.errors import ConversionError, IdentityWeightsError  # noqa: E402
from fasdiff_jax.models import identity as idm  # noqa: E402

H, W = 600, 512  # common canvas: grace_hopper is 600x512, astronaut 512x512 (zero-padded)


def _jpeg(img: np.ndarray, quality: int = 50) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _load_faces() -> dict[str, np.ndarray]:
    import matplotlib.cbook as cbook
    from PIL import Image
    from skimage import data

    astronaut = data.astronaut()
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {
        "astronaut": astronaut,
        "hopper": hopper,
        "astronaut_q50": _jpeg(astronaut),
        "hopper_q50": _jpeg(hopper),
    }


@pytest.fixture(scope="module")
def setup():
    module, params = idm.load_dlib_identity()
    faces = _load_faces()
    rec = dlib.face_recognition_model_v1(idm.default_model_path())
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(idm.default_landmarks_path())
    names = list(faces)
    shapes, chips, refs, details = [], [], [], []
    for name in names:
        img = faces[name]
        rects, scores, _ = detector.run(img, 1, 0.0)
        assert len(rects) >= 1, f"{name}: dlib found no face"
        shape = predictor(img, rects[int(np.argmax(scores))])
        chip = dlib.get_face_chip(img, shape, 150, 0.25)
        shapes.append([(shape.part(j).x, shape.part(j).y) for j in range(5)])
        chips.append(np.asarray(chip))
        refs.append(np.asarray(rec.compute_face_descriptor(chip)))
        details.append(dlib.get_face_chip_details(shape, 150, 0.25))
    canvas = np.zeros((len(names), H, W, 3), np.float32)
    for i, name in enumerate(names):
        h, w, _ = faces[name].shape
        canvas[i, :h, :w] = faces[name]
    # One compiled function gives descriptors and the gradient of their distance to the other
    # person's dlib descriptor w.r.t. the chips: forward parity and differentiability share
    # a single compile of the network.
    targets = jnp.asarray(np.roll(np.stack(refs), 1, axis=0), jnp.float32)

    def loss(p, x):
        desc = module.apply({"params": p}, x)
        return idm.identity_distance(desc, targets).sum(), desc

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))
    (_, ours_dlib_chips), _ = fwd_bwd(params, jnp.asarray(np.stack(chips), jnp.float32))
    landmarks = np.asarray(shapes, np.float64)
    tforms = np.asarray(jax.jit(idm.face_chip_transform)(jnp.asarray(landmarks)))
    chip_fn = jax.jit(idm.face_chips_from_landmarks)
    our_chips = chip_fn(jnp.asarray(canvas), jnp.asarray(landmarks, jnp.float32))
    (loss_value, ours_our_chips), g_chips = fwd_bwd(params, our_chips)
    # The host helper finds the same landmarks as the dlib calls above.
    np.testing.assert_array_equal(idm.detect_landmarks_dlib(faces["hopper"])[0], landmarks[1])
    return dict(
        module=module, params=params, names=names, faces=faces, canvas=canvas,
        landmarks=landmarks, tforms=tforms, targets=np.asarray(targets), chip_fn=chip_fn,
        fwd_bwd=fwd_bwd,
        loss_value=float(loss_value), g_chips=np.asarray(g_chips), dlib_chips=np.stack(chips),
        refs=np.stack(refs), details=details,
        ours=np.asarray(ours_dlib_chips), our_chips=np.asarray(our_chips),
        ours_our_chips=np.asarray(ours_our_chips),
    )


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_descriptor_parity_with_dlib(setup):
    """Same chip in, same 128-D descriptor out as dlib's compute_face_descriptor."""
    ours, refs = setup["ours"], setup["refs"]
    assert ours.shape == (len(setup["names"]), 128)
    cos = _cos(ours, refs)
    for name, c, o, r in zip(setup["names"], cos, ours, refs):
        assert c >= 0.9999, f"{name}: cosine {c}"
        np.testing.assert_allclose(o, r, atol=1e-4, err_msg=name)


def test_jpeg_same_face_closer_than_other_person(setup):
    # all pairwise distances / cosines in one jitted call (the helpers broadcast)
    pairwise = jax.jit(lambda o: (idm.identity_distance(o[:, None], o[None, :]),
                                  idm.identity_cosine(o[:, None], o[None, :])))
    dists, coss = (np.asarray(v) for v in pairwise(jnp.asarray(setup["ours"])))
    ref_d = np.linalg.norm(setup["ours"][:, None] - setup["ours"][None, :], axis=-1)
    np.testing.assert_allclose(dists, ref_d, atol=1e-5)
    ix = {n: i for i, n in enumerate(setup["names"])}
    dist = lambda a, b: float(dists[ix[a], ix[b]])  # noqa: E731
    between = dist("astronaut", "hopper")
    assert dist("astronaut", "astronaut_q50") < between
    assert dist("hopper", "hopper_q50") < between
    # dlib's own decision rule: same person below 0.6, different above.
    assert dist("astronaut", "astronaut_q50") < 0.6 < between
    assert coss[ix["hopper"], ix["hopper_q50"]] > coss[ix["hopper"], ix["astronaut"]]
    np.testing.assert_allclose(np.diag(dists), 0.0, atol=1e-5)


def test_chip_geometry_matches_dlib(setup):
    """Our chip transform reproduces dlib's chip_details (centre, angle, size)."""
    tf = setup["tforms"]
    for t, det in zip(tf, setup["details"]):
        r = det.rect
        centre_dlib = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
        centre_ours = t[:, :2] @ np.array([74.5, 74.5]) + t[:, 2]
        np.testing.assert_allclose(centre_ours, centre_dlib, atol=1e-3)
        assert np.arctan2(t[1, 0], t[0, 0]) == pytest.approx(det.angle, abs=1e-6)
        step = np.hypot(t[0, 0], t[1, 0])
        assert step * 149 == pytest.approx(r.right() - r.left(), abs=1e-3)


def test_chip_extractor_matches_dlib(setup):
    """JAX chips equal dlib's up to dlib's uint8 truncation; descriptors agree."""
    ours, ref = setup["our_chips"], setup["dlib_chips"].astype(np.float32)
    diff = ours - ref
    # dlib stores chips as uint8 by truncation: ours - dlib lies in [0, 1) up to float error.
    assert np.abs(diff).max() <= 1.0 + 1e-2, np.abs(diff).max()
    assert np.mean(diff < -1e-2) < 1e-3, np.mean(diff < -1e-2)
    assert np.mean(np.floor(ours + 1e-3) != ref) < 0.01, np.mean(np.floor(ours + 1e-3) != ref)
    cos = _cos(setup["ours_our_chips"], setup["refs"])
    assert np.all(cos >= 0.9999), cos


def test_gradient_through_chips_and_network(setup):
    """identity distance is differentiable w.r.t. chips, image pixels and landmarks."""
    g_chips = setup["g_chips"]
    assert np.all(np.isfinite(g_chips)) and np.all(np.abs(g_chips).reshape(4, -1).sum(1) > 0)
    expect = np.linalg.norm(setup["ours_our_chips"] - setup["targets"], axis=-1).sum()
    assert setup["loss_value"] == pytest.approx(expect, rel=1e-4)
    # Chain the chip gradient back to the image and the landmarks (vjp of the extractor).
    img = jnp.asarray(setup["canvas"])
    lms = jnp.asarray(setup["landmarks"], jnp.float32)
    chip_vjp = jax.jit(lambda i, l, g: jax.vjp(idm.face_chips_from_landmarks, i, l)[1](g))
    g_img, g_lms = (np.asarray(g) for g in chip_vjp(img, lms, jnp.asarray(g_chips)))
    assert np.all(np.isfinite(g_img)) and np.all(np.isfinite(g_lms))
    assert np.all(np.abs(g_lms).reshape(4, -1).sum(1) > 0)
    # Only pixels inside the astronaut's face chip receive gradient.
    assert np.abs(g_img[0, 400:]).sum() == 0
    assert np.abs(g_img[0, 100:150, 190:250]).sum() > 0
    # First-order check: a small step against the pixel gradient lowers the distance.
    eps = 0.25 / np.abs(g_img).max()
    chips2 = setup["chip_fn"](img - eps * g_img, lms)
    (lower, _), _ = setup["fwd_bwd"](setup["params"], chips2)
    assert float(lower) < setup["loss_value"]


def test_truncated_model_file_raises(tmp_path):
    data = open(idm.default_model_path(), "rb").read()
    for cut in (3, 1000, len(data) - 100):
        p = tmp_path / f"cut{cut}.dat"
        p.write_bytes(data[:cut])
        with pytest.raises(IdentityWeightsError, match="truncated"):
            idm.load_dlib_identity(str(p))
    p = tmp_path / "extra.dat"
    p.write_bytes(data + b"\x00")
    with pytest.raises(IdentityWeightsError, match="trailing"):
        idm.read_dlib_identity_file(str(p))


def test_corrupt_or_missing_model_file_raises(tmp_path):
    data = open(idm.default_model_path(), "rb").read()
    i = data.index(b"con_4")
    p = tmp_path / "bad.dat"
    p.write_bytes(data[:i] + b"con_9" + data[i + 5 :])
    with pytest.raises(IdentityWeightsError, match="con_"):
        idm.read_dlib_identity_file(str(p))
    # The 5-point shape predictor is a dlib file too, but not this network.
    with pytest.raises(ConversionError):
        idm.read_dlib_identity_file(idm.default_landmarks_path())
    with pytest.raises(IdentityWeightsError, match="cannot read"):
        idm.load_dlib_identity(os.fspath(tmp_path / "missing.dat"))
