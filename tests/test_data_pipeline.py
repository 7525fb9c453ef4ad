"""Grain pipeline: determinism, exact resume, global sharded arrays, two-process sharding."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from fasdiff_jax.data.pipeline import DataConfig, make_dataset, make_train_iterator, to_model_input
from fasdiff_jax.errors import DataError
from fasdiff_jax.sharding import create_mesh
from data_fixtures import embedded_dirs  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def index_source(n=24):
    """Images whose pixels encode their index (and varied sizes, so crops must resize)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = 40 + (i % 3) * 8, 48 - (i % 2) * 8
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[..., 0] = i
        out.append({"image": img})
    return out


def cfg(**kw):
    base = dict(source="unused", image_size=16, global_batch_size=8, seed=3, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def local_batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_differs():
    src = index_source()
    a = local_batches(make_dataset(cfg(), src, 0, 1), 5)
    b = local_batches(make_dataset(cfg(), src, 0, 1), 5)
    c = local_batches(make_dataset(cfg(seed=4), src, 0, 1), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["index"], y["index"])
    assert any((x["index"] != z["index"]).any() for x, z in zip(a, c))
    assert a[0]["image"].shape == (8, 16, 16, 3) and a[0]["image"].dtype == np.uint8


@pytest.mark.parametrize("h, w", [(108, 192), (480, 640), (640, 480), (10, 200), (64, 64)])
@pytest.mark.parametrize("ratio", [(0.9, 1.1), (1.2, 1.5), (0.5, 0.6)])
def test_random_crops_keep_their_aspect_on_any_image_shape(h, w, ratio):
    """The crop's area was a share of the whole image's: on a 1920x1080 photo its side over the
    height was cut to it, the crop 1.14-1.40 wide per high, then resized to a square."""
    from fasdiff_jax.data.pipeline import CropFlip

    crop, rng = CropFlip(16, (0.3, 1.0), ratio), np.random.default_rng(0)
    side = min(h, w)
    for _ in range(200):
        x0, y0, x1, y1 = crop.crop_box(h, w, rng)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        cw, ch = x1 - x0, y1 - y0
        assert ratio[0] * (1 - 1 / ch) - 1 / ch <= cw / ch <= ratio[1] * (1 + 1 / ch) + 1 / ch
        assert cw * ch <= side * side * 1.0 * (1 + 2 / min(cw, ch)) ** 2
        # not collapsed: at least the area drawn, shrunk only as far as the image needs
        least = side * side * 0.3 * min(1.0, side / (side * max(ratio) ** 0.5),
                                        side / (side / min(ratio) ** 0.5)) ** 2
        assert (cw + 1) * (ch + 1) >= least, (cw, ch, least)

class _CountingSource(list):
    """A source that counts the records read from it."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


@pytest.mark.parametrize("threads, ahead", [(2, 2), (0, 0)])
def test_reading_ahead_is_bounded_and_changes_no_batch(threads, ahead):
    """Only ``prefetch_batches`` batches are decoded ahead of the one taken (Grain's default
    read 500 batches ahead, here an endless stream of them, from the first batch on); reading
    ahead on threads or in the caller's thread gives the same batches."""
    import time

    src = _CountingSource(index_source(24))
    it = iter(make_dataset(cfg(global_batch_size=4, read_threads=threads, prefetch_batches=ahead),
                           src, 0, 1))
    first = next(it)
    time.sleep(0.5)  # time for threads to run ahead, were they unbounded
    assert src.reads <= 4 * (1 + ahead), src.reads
    got = [first] + [next(it) for _ in range(7)]
    it.close()
    want = local_batches(make_dataset(cfg(global_batch_size=4), index_source(24), 0, 1), 8)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x["image"], y["image"])
    with pytest.raises(DataError, match="prefetch_batches must be an integer >= 0, got -1"):
        cfg(prefetch_batches=-1)


@pytest.mark.parametrize("field, value, message", [
    ("crop_scale", (0.5,), "crop_scale must be two numbers (lo, hi) with 0 < lo <= hi <= 1, "
                           "got (0.5,)"),
    ("crop_ratio", (1, 2, 3), "crop_ratio must be two numbers (lo, hi) with 0 < lo <= hi, got"),
    ("crop_scale", "ab", "crop_scale must be two numbers"),
    ("crop_scale", (0.9, 0.5), "crop_scale must be two numbers"),
    ("worker_buffer_size", 0, "worker_buffer_size must be an integer >= 1, got 0"),
    ("seed", -1, "seed must be an integer >= 0, got -1"),
    ("global_batch_size", 3.5, "global_batch_size must be an integer >= 1, got 3.5"),
    ("image_size", 0, "image_size must be an integer >= 1, got 0"),
    ("num_epochs", 2.5, "num_epochs must be an integer >= 1, or None"),
])
def test_bad_data_fields_are_one_readable_error(field, value, message):
    """Every field of ``config.data`` can be overridden; a value the pipeline cannot use is a
    DataError naming it (a one-number crop_scale was a bare unpacking ValueError, a negative
    seed or a worker buffer of 0 failed inside Grain)."""
    import re

    with pytest.raises(DataError, match="^" + re.escape(f"data config: {message}")):
        cfg(**{field: value})


def test_batch_axes_must_be_axes_of_the_mesh(devices8):
    """A mistyped batch axis used to be skipped: the batch was then replicated on every
    device instead of split."""
    mesh = create_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(DataError, match=r"batch_axes \('dta',\): 'dta' is not an axis of the "
                                        r"mesh \('data', 'fsdp', 'tensor'\)"):
        make_train_iterator(cfg(batch_axes=("dta",)), mesh, source=index_source())


def test_one_epoch_visits_each_item_once_and_reshuffles():
    src = index_source(24)
    ds = make_dataset(cfg(num_epochs=2), src, 0, 1)
    batches = list(ds)
    assert len(batches) == 6
    e1 = np.concatenate([b["index"] for b in batches[:3]])
    e2 = np.concatenate([b["index"] for b in batches[3:]])
    assert sorted(e1) == list(range(24)) and sorted(e2) == list(range(24))
    assert (e1 != e2).any()  # a new order each epoch
    assert (e1 != np.arange(24)).any()  # shuffled at all


def test_augmentation_is_a_crop_and_flip_of_the_source():
    src = index_source(4)
    noaug = list(make_dataset(cfg(augment=False, shuffle=False, num_epochs=1, global_batch_size=4,
                                  image_size=32), src, 0, 1))[0]
    # Without augmentation the output is the resized centre square, index channel intact.
    for k in range(4):
        assert np.abs(noaug["image"][k, ..., 0].astype(int) - int(noaug["index"][k])).max() <= 1
    aug = list(make_dataset(cfg(global_batch_size=4, num_epochs=1), src, 0, 1))[0]
    for k in range(4):
        assert np.abs(aug["image"][k, ..., 0].astype(int) - int(aug["index"][k])).max() <= 1


def test_restore_mid_epoch_reproduces_next_batches():
    src = index_source()
    it = make_train_iterator(cfg(), create_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                devices=jax.devices()[:1]), source=src)
    for _ in range(2):
        next(it)
    state = it.get_state()
    json.dumps(state)  # serialisable as is (Orbax / JSON)
    expected = [jax.device_get(next(it)) for _ in range(4)]  # crosses the epoch boundary
    it2 = make_train_iterator(cfg(), it.mesh, source=src)
    it2.set_state(state)
    for e in expected:
        got = jax.device_get(next(it2))
        np.testing.assert_array_equal(got["image"], e["image"])
        np.testing.assert_array_equal(got["index"], e["index"])


def test_global_array_sharded_over_batch_axes(devices8):
    mesh = create_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    it = make_train_iterator(cfg(), mesh, source=index_source())
    b = next(it)
    assert isinstance(b["image"], jax.Array) and b["image"].shape == (8, 16, 16, 3)
    assert b["image"].sharding.spec[0] == ("data", "fsdp")
    assert len(b["image"].addressable_shards) == 8
    assert {s.data.shape for s in b["image"].addressable_shards} == {(1, 16, 16, 3)}
    x = jax.jit(to_model_input)(b["image"])
    assert x.dtype == np.float32 and float(x.min()) >= -1 and float(x.max()) <= 1


def test_config_from_configdict_and_errors():
    c = ml_collections.ConfigDict({"data": {"source": "x", "image_size": 64, "global_batch_size": 6,
                                            "crop_scale": [0.5, 1.0], "unrelated": 1}})
    d = DataConfig.from_config(c)
    assert (d.source, d.image_size, d.global_batch_size, d.crop_scale) == ("x", 64, 6, (0.5, 1.0))
    with pytest.raises(DataError, match="divisible"):
        make_dataset(cfg(global_batch_size=7), index_source(), 0, 2)
    with pytest.raises(DataError, match="crop_scale"):
        DataConfig.from_config({"crop_scale": (0.5, 1.5)})
    with pytest.raises(DataError, match="image_size must be an integer >= 1, got 0"):
        DataConfig(image_size=0)
    with pytest.raises(DataError, match="batch axes"):
        make_train_iterator(cfg(global_batch_size=6), create_mesh({"data": 2, "fsdp": 4, "tensor": 1}),
                            source=index_source())
    with pytest.raises(DataError, match="expected uint8"):
        next(iter(make_dataset(cfg(), [{"image": np.zeros((8, 8), np.float32)}] * 8, 0, 1)))


def test_worker_processes_match_in_process_and_resume(embedded_dirs):
    """2 worker processes yield the same batches as none; a mid-epoch state restores exactly."""
    mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    base = dict(source="prepared:" + embedded_dirs["train"], image_size=32, global_batch_size=4)
    ref = local_batches(make_dataset(cfg(**base), None, 0, 1), 12)  # 48 > one epoch (29)
    with make_train_iterator(cfg(num_workers=2, **base), mesh) as it:
        got = [jax.device_get(next(it)) for _ in range(5)]
        state = it.get_state()
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(r["image"], g["image"])
        np.testing.assert_array_equal(r["index"], g["index"])
    with make_train_iterator(cfg(num_workers=2, **base), mesh) as it2:
        it2.set_state(state)
        for r in ref[5:]:  # crosses the epoch boundary
            g = jax.device_get(next(it2))
            np.testing.assert_array_equal(g["image"], r["image"])
            np.testing.assert_array_equal(g["index"], r["index"])


def test_a_data_position_resumes_with_another_worker_count(embedded_dirs):
    """Grain's state has another form per num_workers: a state of 2 workers restored with 0
    raised KeyError, with 1 IndexError, and 1 -> 2 resumed silently at other batches. The
    iterator now carries the position over; each form is checked against Grain's own."""
    from fasdiff_jax.data.pipeline import state_at, state_position, state_workers

    mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    base = dict(source="prepared:" + embedded_dirs["train"], image_size=16, global_batch_size=4)
    ref = local_batches(make_dataset(cfg(**base), None, 0, 1), 10)
    states = {}
    for workers in (0, 2):
        with make_train_iterator(cfg(num_workers=workers, **base), mesh) as it:
            for _ in range(5):
                next(it)
            states[workers] = it.get_state()
        assert states[workers] == state_at(5, workers), workers
        assert state_position(states[workers]) == 5 and state_workers(states[workers]) == workers
    for saved, now in ((2, 0), (0, 2)):
        with make_train_iterator(cfg(num_workers=now, **base), mesh) as it:
            it.set_state(states[saved])
            for r in ref[5:8]:
                np.testing.assert_array_equal(jax.device_get(next(it))["index"], r["index"])
    odd = {**states[2], "exhausted": [0, 1]}  # a worker run out: no single position
    with make_train_iterator(cfg(num_workers=0, **base), mesh) as it:
        with pytest.raises(DataError, match=r"written with data.num_workers=2: .* cannot be "
                                            r"resumed with data.num_workers=0: rerun with"):
            it.set_state(odd)

TWO_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    import numpy as np
    from fasdiff_jax.data.pipeline import DataConfig, make_train_iterator
    from fasdiff_jax.sharding import create_mesh
    src = [{"image": np.full((8, 8, 3), i, np.uint8)} for i in range(16)]
    mesh = create_mesh({"data": 4, "fsdp": 1, "tensor": 1})
    cfg = DataConfig(source="unused", image_size=8, global_batch_size=4, num_epochs=1, seed=1)
    seen, shapes = [], set()
    for b in make_train_iterator(cfg, mesh, source=src):
        shapes.add(tuple(b["image"].shape))
        for s in b["index"].addressable_shards:
            seen += np.asarray(s.data).tolist()
    print("RESULT" + json.dumps({"pid": jax.process_index(), "n": jax.process_count(),
                                 "seen": seen, "shapes": sorted(shapes),
                                 "devices": len(jax.devices())}))
    jax.distributed.shutdown()
    """
)


def test_two_processes_see_disjoint_shards_covering_the_dataset(tmp_path):
    script = tmp_path / "two_proc.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT", 1)[1]))
    assert sorted(r["pid"] for r in results) == [0, 1]
    assert all(r["n"] == 2 and r["devices"] == 4 for r in results)
    assert all(r["shapes"] == [[4, 8, 8, 3]] for r in results)
    a, b = (set(r["seen"]) for r in results)
    assert len(results[0]["seen"]) == len(a) == 8 and len(b) == 8
    assert not a & b and a | b == set(range(16))
