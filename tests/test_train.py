"""The train loop on the tiny config and 8 fake CPU devices (mesh data=8).

One scenario, run once per module (the FaSDiff step compiles once; the test session's
persistent compilation cache, see ``conftest.py``, serves the later runs):

A. ``main`` (absl flags, config overrides) trains 6 steps in ``a/``, checkpoints at 3 and 6,
   held-out evaluation after steps 3 and 6;
B. a copy of A's step-3 checkpoint only (as if A had been killed after step 3) is resumed
   in ``b/`` to step 6: steps 4-6 and the evaluation after step 6 must match A's exactly;
N. ``b/`` is resumed with ``learning_rate=1e30`` to step 8 (a NaN rate is refused at the
   start): the params overflow after step 7, the loss at step 8 is not finite, the run stops
   naming the terms and step 6 stays the latest (finite) checkpoint.

Separately, ``main --jax_distributed`` trains in two real processes (gloo) until one gets a
preemption notice, and one process resumes their checkpoint
(:func:`test_two_processes_train_and_one_process_resumes`).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import functools
import glob
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import celeba, mbt2018_mean, tiny
from data_fixtures import embedded_dirs  # noqa: F401 (fixture)
from fasdiff_jax import convert, errors, safetensors_io, sharding, train
from fasdiff_jax.errors import DataError
from fasdiff_jax.errors import IdentityWeightsError, NonFiniteLossError
from fasdiff_jax.models import fasdiff
from fasdiff_jax.models import hyperprior as H
from fasdiff_jax.models import train_step

ROOT = Path(__file__).resolve().parents[1]
TERMS = ("bpp", "diffusion", "latent", "high_freq", "loss", "grad_norm")


def _overrides(source: str) -> dict:
    return {"data.source": source, "mesh.data": 8, "train.x0_every": 1000, "train.log_every": 1,
            "train.checkpoint_every": 3, "train.max_to_keep": 5,
            "train.ema_decay": 0.9,  # held-out metrics and coding: the params' moving average
            "train.lr_multipliers.controlnet": 0.5}


def _eval_overrides(heldout: str) -> dict:
    return {"eval.source": f"prepared:{heldout}", "eval.every_steps": 3}


def _config(source: str, **extra):
    cfg = tiny.get_config()
    for k, v in {**_overrides(source), **extra}.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def _scalars(workdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the CLU summaries in ``workdir``: tag -> step -> value."""
    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(str(workdir / "events.out.tfevents*"))):
        for ev in tf.compat.v1.train.summary_iterator(path):
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name != "scalars":  # hparams, text
                    continue
                out.setdefault(v.tag, {})[ev.step] = float(tf.make_ndarray(v.tensor))
    return out


def _pictures(workdir: Path) -> dict[str, dict[int, np.ndarray]]:
    """Every image summary in ``workdir``: tag -> step -> uint8 (n, H, W, 3)."""
    import io

    import tensorflow as tf
    from PIL import Image

    out: dict[str, dict[int, np.ndarray]] = {}
    for path in sorted(glob.glob(str(workdir / "events.out.tfevents*"))):
        for ev in tf.compat.v1.train.summary_iterator(path):
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "images":  # [width, height, png...]
                    pngs = tf.make_ndarray(v.tensor)[2:]
                    out.setdefault(v.tag, {})[ev.step] = np.stack(
                        [np.asarray(Image.open(io.BytesIO(p))) for p in pngs])
    return out


def _saved_state(workdir: Path, step: int) -> dict:
    """A checkpoint's params and optimizer state on one device, whatever topology wrote it."""
    path = workdir / "checkpoints" / str(step) / "state"
    return ocp.StandardCheckpointer().restore(path, train.one_device_target(path))


def _saved_params(workdir: Path, step: int, ema: bool = False) -> dict:
    """The params (``ema``: their moving average) a checkpoint saved, by path."""
    state = _saved_state(workdir, step)
    tree = state["opt_state"]["ema_params"] if ema else state["params"]
    return {_path(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def scenario(embedded_dirs, tmp_path_factory):  # noqa: F811
    from fasdiff_jax import main as main_lib

    src = f"prepared:{embedded_dirs['train']}"
    root = tmp_path_factory.mktemp("train")
    a, b = root / "a", root / "b"
    argv = ["main", f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={a}",
            "--config.train.steps=6", "--config.model.sampler.steps=3"]  # saved in config.json
    held = _eval_overrides(embedded_dirs["heldout"])
    argv += [f"--config.{k}={v}" for k, v in {**_overrides(src), **held}.items()]
    with mock.patch.object(sys, "argv", argv):  # config_flags reads overrides from sys.argv
        main_lib.FLAGS(argv)
    try:
        main_lib.main(argv[:1])
    finally:
        main_lib.FLAGS.unparse_flags()
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "3", b / "checkpoints" / "3")
    programs_of_a = next(reversed(train._PROGRAMS.values()))
    resumed = train.train_and_evaluate(
        _config(src, **{"train.steps": 6, "model.sampler.steps": 3, **held}), str(b))
    programs_of_b = next(reversed(train._PROGRAMS.values()))
    b_scalars = _scalars(b)
    with pytest.raises(NonFiniteLossError) as nan_error:
        # a step of ~1e30 on every param: the next step's terms overflow (the rate is not
        # in the program key, so the resumed run's compiled step is reused)
        train.train_and_evaluate(_config(src, **{"train.steps": 8, "train.learning_rate": 1e30,
                                                 "train.checkpoint_every": 2}), str(b))
    return dict(a=a, b=b, resumed=resumed, b_scalars=b_scalars, nan_error=nan_error.value,
                source=src, held=held, same_programs=programs_of_b is programs_of_a)


@pytest.mark.xdist_group("train_scenario")  # one worker builds the scenario
def test_main_writes_checkpoints_and_summaries(scenario):
    a = scenario["a"]
    assert _steps(a) == [3, 6]
    for step in (3, 6):
        d = a / "checkpoints" / str(step)
        assert json.loads((d / "meta" / "metadata").read_text())["step"] == step
        data = json.loads((d / "data" / "process_0-of-1.json").read_text())
        assert data["next_index"] == step  # one batch per step
        saved = _saved_params(a, step)  # trainable parts only: frozen SD/metric nets are not saved
        assert {k.split("/")[0] for k in saved} == set(fasdiff.TRAINABLE)
    s = _scalars(a)
    for term in TERMS + ("learning_rate",):
        assert sorted(s[f"train/{term}"]) == [1, 2, 3, 4, 5, 6], term
        assert all(np.isfinite(list(s[f"train/{term}"].values())))
    assert s["train/learning_rate"][6] == pytest.approx(1e-3)
    assert "train/identity" not in s  # x0_every=1000: the x̂0 step never ran
    assert any(t.startswith("steps_per_sec") for t in s)  # ReportProgress
    assert s["train/loss"][6] < s["train/loss"][1]
    # held-out terms after steps 3 and 6 (x̂0 terms included: eval.x0_terms), all finite
    for term in ("bpp", "diffusion", "latent", "high_freq", "identity", "lpips", "loss"):
        assert sorted(s[f"eval/{term}"]) == [3, 6], term
        assert all(np.isfinite(list(s[f"eval/{term}"].values()))), term
    assert s["eval/loss"][6] != s["eval/loss"][3]  # the params changed in between
    pictures = _pictures(a)["eval/reconstructions"]  # 4 held-out faces | reconstructions
    assert sorted(pictures) == [3, 6] and pictures[6].shape == (4, 64, 128, 3)
    np.testing.assert_array_equal(pictures[3][:, :, :64], pictures[6][:, :, :64])  # same faces
    assert not np.array_equal(pictures[3][:, :, 64:], pictures[6][:, :, 64:])


@pytest.mark.xdist_group("train_scenario")  # one worker builds the scenario
def test_resume_equals_uninterrupted_run(scenario):
    a_s, b_s = _scalars(scenario["a"]), scenario["b_scalars"]
    for term in TERMS:
        assert sorted(b_s[f"train/{term}"]) == [4, 5, 6]
        for step in (4, 5, 6):
            assert b_s[f"train/{term}"][step] == pytest.approx(a_s[f"train/{term}"][step],
                                                               rel=1e-6, abs=1e-7), (term, step)
    assert scenario["resumed"]["step"] == 6
    assert scenario["same_programs"]  # the resume in this process reused run A's jitted steps
    for term in ("bpp", "diffusion", "identity", "lpips", "loss"):  # same images, same draws
        assert sorted(b_s[f"eval/{term}"]) == [6]
        assert b_s[f"eval/{term}"][6] == pytest.approx(a_s[f"eval/{term}"][6], rel=1e-5,
                                                       abs=1e-7), term
        assert scenario["resumed"][f"eval/{term}"] == pytest.approx(b_s[f"eval/{term}"][6])
    a_pictures = _pictures(scenario["a"])["eval/reconstructions"]
    b_pictures = _pictures(scenario["b"])["eval/reconstructions"]
    assert sorted(b_pictures) == [6]
    # same faces, sampler and draws; params equal to ~1e-6, which could flip a rounded latent
    assert np.abs(b_pictures[6].astype(int) - a_pictures[6]).mean() < 0.5
    for ema in (False, True):  # the params and their moving average
        want, got = _saved_params(scenario["a"], 6, ema), _saved_params(scenario["b"], 6, ema)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.xdist_group("train_scenario")  # one worker builds the scenario
def test_a_resume_on_another_mesh_reshards_the_state(scenario, tmp_path, monkeypatch):
    """A run resumed on another mesh (a pod slice of another shape, or fsdp/tensor to fit
    memory): the checkpoint, written from data=8 (replicated state), is restored straight
    into the new layout's shardings and the run goes on as the uninterrupted one (up to the
    reduction order the new layout changes). The new mesh uses all three axes, the layout
    whose gradients XLA gets wrong unless the step gathers the params (``grad_norm`` checks
    them)."""
    c = tmp_path / "c"
    (c / "checkpoints").mkdir(parents=True)
    shutil.copytree(scenario["a"] / "checkpoints" / "3", c / "checkpoints" / "3")
    real, targets = train._restore, []

    def spy(mngr, step, workdir, **items):
        if "state" in items:
            targets.extend(jax.tree.leaves(items["state"].item))
        return real(mngr, step, workdir, **items)

    monkeypatch.setattr(train, "_restore", spy)
    cfg = _config(scenario["source"], **{"train.steps": 4, "model.sampler.steps": 3,
                                         "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    assert train.train_and_evaluate(cfg, str(c))["step"] == 4
    axes = {a for x in targets for e in x.sharding.spec if e is not None
            for a in (e if isinstance(e, tuple) else (e,))}
    assert axes >= {"fsdp", "tensor"}, axes
    a_s, c_s = _scalars(scenario["a"]), _scalars(c)
    for term in TERMS:
        assert sorted(c_s[f"train/{term}"]) == [4]
        assert c_s[f"train/{term}"][4] == pytest.approx(a_s[f"train/{term}"][4], rel=1e-4,
                                                         abs=1e-6), term


@pytest.mark.xdist_group("train_scenario")  # one worker builds the scenario
def test_a_resume_with_other_data_workers_gets_the_same_batches(scenario, tmp_path, caplog):
    """Grain's state depends on data.num_workers: checkpoint 3 (0 workers) resumed with 2 was
    'damaged' (KeyError 'exhausted'), and 1 -> 2 resumed silently at other batches. Now the
    position is carried over: step 4 sees run A's batch. Here checkpoint 3's state is written
    in the form 2 workers give (``state_at``, checked equal to Grain's own in
    test_data_pipeline) and resumed with 0, so no worker process is started."""
    from fasdiff_jax.data.pipeline import state_at

    d = tmp_path / "d"
    (d / "checkpoints").mkdir(parents=True)
    shutil.copytree(scenario["a"] / "checkpoints" / "3", d / "checkpoints" / "3")
    saved = d / "checkpoints" / "3" / "data" / "process_0-of-1.json"
    assert json.loads(saved.read_text()) == state_at(3, 0)
    saved.write_text(json.dumps(state_at(3, 2)))
    cfg = _config(scenario["source"], **{"train.steps": 4, "model.sampler.steps": 3})
    with caplog.at_level(logging.INFO, logger="absl"):
        assert train.train_and_evaluate(cfg, str(d))["step"] == 4
    assert "saved with data.num_workers=2; it resumes at the same batch with 0" in caplog.text
    a_s, d_s = _scalars(scenario["a"]), _scalars(d)
    for term in TERMS:
        assert d_s[f"train/{term}"][4] == pytest.approx(a_s[f"train/{term}"][4], rel=1e-6,
                                                         abs=1e-7), term
    assert json.loads((d / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text()
                      ) == state_at(4, 0)


def _conv_pair_loss(params, x, rng):
    """A stride-2 conv then a conv: the smallest net whose gradients XLA gets wrong on a
    data x fsdp x tensor mesh (next test)."""
    del rng
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, params["w1"], (2, 2), "SAME", dimension_numbers=dn)
    loss = jnp.mean(jax.lax.conv_general_dilated(y, params["w2"], (1, 1), "SAME",
                                                 dimension_numbers=dn) ** 2)
    return loss, {"loss": loss}


def _conv_pair_case():
    r = np.random.default_rng(0)
    params = {"w1": (r.standard_normal((5, 5, 16, 24)) * 0.1).astype(np.float32),
              "w2": (r.standard_normal((3, 3, 24, 16)) * 0.1).astype(np.float32)}
    return params, r.standard_normal((8, 8, 8, 16)).astype(np.float32)


def test_the_train_step_computes_with_params_gathered_over_the_batch_axes(devices8):
    """On data=2, fsdp=2, tensor=2 (kernels split over fsdp and tensor, the batch over data
    and fsdp) the step's update equals one device's when the params are gathered over the
    batch axes for the losses (what the train loop does), and the params keep their own
    shardings. Without the gathering the update is ~100% off (XLA's bug, next test)."""
    from jax.sharding import Mesh

    params, x = _conv_pair_case()
    sgd = optax.sgd(1.0)
    one = train_step.make_train_step(_conv_pair_loss, lambda p: (p, {}), sgd, donate=False)
    want = jax.device_get(one(params, sgd.init(params), x, jax.random.key(0))[0])
    mesh = Mesh(np.array(devices8).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    p_sh = {k: NamedSharding(mesh, P(None, None, "fsdp", "tensor")) for k in params}
    x_on_mesh = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    errors = {}
    for gather in ((), ("data", "fsdp")):
        step = train_step.make_train_step(_conv_pair_loss, lambda p: (p, {}), sgd, mesh, p_sh,
                                          donate=False, gather_params_over=gather)
        new = step(jax.device_put(params, p_sh), sgd.init(params), x_on_mesh,
                   jax.random.key(0))[0]
        assert all(new[k].sharding.spec == p_sh[k].spec for k in new)
        errors[gather] = max(float(np.linalg.norm(np.asarray(new[k]) - want[k])
                                   / np.linalg.norm(params[k] - want[k])) for k in params)
    assert errors[("data", "fsdp")] < 1e-5, errors
    assert errors[()] > 0.1, errors  # when this fails XLA is fixed; the gathering can stay


def test_params_are_gathered_only_on_meshes_that_need_it(devices8):
    """Only where XLA's own layout is wrong (the batch over two axes, another axis above 1);
    elsewhere XLA's choice was right and held less memory (benchmarks/RESULTS.md)."""
    def gathered(shape, batch_axes=("data", "fsdp")):
        mesh = sharding.create_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
        return train.params_gathered_over(mesh, batch_axes)

    assert gathered((2, 2, 2)) == ("data", "fsdp")
    assert gathered((1, 2, 4)) == gathered((2, 1, 4)) == gathered((4, 2, 1)) == ()
    assert gathered((1, 8, 1)) == gathered((8, 1, 1)) == ()
    assert gathered((2, 2, 2), ("data",)) == ()
    assert gathered((2, 2, 2), ("data", "tensor")) == ("data", "tensor")


def test_xla_still_miscomputes_strided_conv_gradients_on_a_three_axis_mesh(devices8):
    """Why the train step gathers the params, in plain JAX: the conv pair above, kernels split
    over (fsdp, tensor), the batch over (data, fsdp) and channels over tensor. With all three
    axes at 2 the first kernel's and the input's gradients are wrong (~100% relative error,
    jax 0.10.2, jax-ml/jax#16894); with any two axes they are right. When this test fails,
    XLA is fixed."""
    from jax.sharding import Mesh

    params, x = _conv_pair_case()
    grads = jax.jit(jax.grad(lambda p, x: _conv_pair_loss(p, x, None)[0], (0, 1)))
    want = jax.tree.leaves(grads(params, x))
    errors = {}
    for shape in ((2, 2, 2), (1, 2, 4), (2, 1, 4), (4, 2, 1)):
        mesh = Mesh(np.array(devices8).reshape(shape), ("data", "fsdp", "tensor"))
        ws = NamedSharding(mesh, P(None, None, "fsdp", "tensor"))
        got = jax.tree.leaves(grads(jax.device_put(params, ws), jax.device_put(
            x, NamedSharding(mesh, P(("data", "fsdp"), None, None, "tensor")))))
        errors[shape] = max(float(np.linalg.norm(np.asarray(g) - np.asarray(w))
                                  / np.linalg.norm(np.asarray(w))) for g, w in zip(got, want))
    assert errors[(2, 2, 2)] > 0.1, errors
    assert all(e < 1e-5 for s, e in errors.items() if s != (2, 2, 2)), errors


@pytest.mark.xdist_group("train_scenario")  # one worker builds the scenario
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(scenario):
    err, b = scenario["nan_error"], scenario["b"]
    assert "at step 8" in str(err)
    assert {"loss", "diffusion", "bpp"} <= set(err.terms) and "learning_rate" not in err.terms
    assert _steps(b) == [3, 6]  # nothing saved at or after the NaN
    assert all(np.isfinite(v).all() for v in _saved_params(b, 6).values())


@pytest.mark.xdist_group("train_scenario")  # after the scenario: its compiled step is cached
def test_sigterm_saves_the_current_step_and_the_resume_matches(scenario, tmp_path):
    """A preemption notice (SIGTERM, here sent while step 3 fetches its batch) makes the loop
    finish that step, save it and return; rerunning continues exactly like run A."""
    src = scenario["source"]
    work = tmp_path / "p"
    real = train.make_train_iterator
    preempting = lambda *a, **k: _Preempting(real(*a, **k), at_call=3)  # noqa: E731
    before = signal.getsignal(signal.SIGTERM)
    with mock.patch.object(train, "make_train_iterator", preempting):
        out = train.train_and_evaluate(_config(src, **{"train.steps": 6,
                                                       "train.checkpoint_every": 100}), str(work))
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone again
    assert out["step"] == 3 and _steps(work) == [3]
    assert out["stopped_by_signal"] == signal.SIGTERM  # main exits 143 (it exited 0)
    resumed = train.train_and_evaluate(_config(src, **{"train.steps": 5}), str(work))
    assert resumed["step"] == 5 and "stopped_by_signal" not in resumed
    a, p = _scalars(scenario["a"]), _scalars(work)
    for term in TERMS:
        for step in (1, 2, 3, 4, 5):
            assert p[f"train/{term}"][step] == pytest.approx(a[f"train/{term}"][step],
                                                             rel=1e-6, abs=1e-7), (term, step)


def test_a_first_ctrl_c_saves_and_stops_a_second_stops_at_once():
    """Ctrl-C ended a run with a traceback, the steps since the last checkpoint lost; now
    the first one is a preemption notice (the loop saves the step it is on and returns: the
    SIGTERM test above), the second the usual KeyboardInterrupt."""
    before = signal.getsignal(signal.SIGINT)
    with train._Preemption() as preemption:
        assert not preemption.reached(None, 1)
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.reached(None, 1) and preemption.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; KeyboardInterrupt ends this
    assert signal.getsignal(signal.SIGINT) is before


class _Preempting:
    """The real train iterator; sends this process SIGTERM when batch ``at_call`` is fetched."""

    def __init__(self, it, at_call: int):
        self._it, self._calls, self._at = it, 0, at_call

    def __next__(self):
        self._calls += 1
        if self._calls == self._at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self._it)

    def __getattr__(self, name):
        return getattr(self._it, name)


# ------------------------------------------------------------------ cheap unit tests
def test_a_failed_summary_write_is_a_warning_and_training_goes_on(caplog):
    """An events file that could not be flushed (made read-only during a run) ended training
    with CLU's AsyncError traceback (3 producer-thread tracebacks before it), exit 1, and the
    steps since the last checkpoint lost. Here CLU's real async writer fails under the run's
    writer: one warning naming the cause, the metric lines still logged, later writes tried
    again (a transient fault heals)."""
    from absl import logging as absl_logging
    from clu.metric_writers import AsyncWriter, LoggingWriter, MultiWriter, interface

    class Events(interface.MetricWriter):
        failing, written = True, []

        def write_summaries(self, step, values, metadata=None):
            pass

        def write_scalars(self, step, scalars):
            if self.failing:
                raise OSError(errno.EROFS, "Read-only file system", "events.out.tfevents.1")
            self.written.append(step)

        def write_images(self, step, images):
            pass

        def write_videos(self, step, videos):
            pass

        def write_audios(self, step, audios, *, sample_rate):
            pass

        def write_texts(self, step, texts):
            pass

        def write_histograms(self, step, arrays, num_buckets=None):
            pass

        def write_hparams(self, hparams):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    events = Events()
    writer = train.SummaryWriter(MultiWriter([LoggingWriter(), AsyncWriter(events)]), "/w")
    with caplog.at_level(logging.INFO, logger="absl"):
        for step in range(1, 5):
            writer.write_scalars(step, {"train/loss": 0.5})
            time.sleep(0.05)  # the async write fails before the next call re-raises it
        events.failing = False
        for step in range(5, 9):
            writer.write_scalars(step, {"train/loss": 0.25})
        writer.flush()
        # Orbax's, on every save between evaluations while a best checkpoint is tracked
        absl_logging.warning("Requested `tracked_metric`; did not provide metrics.")
    text = caplog.text
    assert text.count("the training summaries (TensorBoard events) cannot be written "
                      "(OSError: [Errno 30] Read-only file system: 'events.out.tfevents.1')") == 1
    assert "summary writes failed in this run" in text
    assert "Error in producer thread" not in text and "Traceback" not in text
    assert "tracked_metric" not in text
    assert text.count("train/loss=0.5") == 4 and text.count("train/loss=0.25") == 4
    assert events.written == [5, 6, 7, 8]
    # a bug is not a write fault: raised as before
    class Buggy(Events):
        def write_scalars(self, step, scalars):
            raise TypeError("a bug")

    writer = train.SummaryWriter(MultiWriter([LoggingWriter(), Buggy()]), "/w")
    with pytest.raises(TypeError, match="a bug"):
        writer.write_scalars(9, {"train/loss": 0.1})


def _save_compiles(tmp_path: Path, devices, first_dim: int) -> tuple[int, dict, dict]:
    """Backend compiles during one Orbax save of small replicated arrays (shapes new to this
    process, so no compiled slice op is cached yet), and the tree saved and restored."""
    mesh = sharding.create_mesh({"data": len(devices)}, devices=devices)
    tree = {f"w{i}": jax.device_put(np.arange(8 * (first_dim + i) * 7, dtype=np.float32)
                                    .reshape(8 * (first_dim + i), 7),
                                    jax.sharding.NamedSharding(mesh, P()))
            for i in range(6)}
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp_path / f"c{first_dim}", tree)
            ckpt.wait_until_finished()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / f"c{first_dim}", tree)
    return compiles.count("/jax/core/compile/backend_compile_duration"), tree, restored


def test_checkpoint_saves_compile_nothing_for_small_replicated_arrays(devices8, tmp_path,
                                                                      caplog):
    """Orbax's default writes each replicated array in 8 slices cut by eager ops (a compile per
    new shape); ours writes arrays under 1 MiB whole (benchmarks/checkpoint_save.py: 16.9 s
    -> 2.0 s for the tiny model's first save)."""
    original = ocp.type_handlers.get_type_handler(jax.Array)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(),
                                                override=True)
        default_compiles, _, _ = _save_compiles(tmp_path, devices8, 101)
        with caplog.at_level("DEBUG", logger="absl"):
            caplog.clear()
            train.register_checkpoint_array_handler()
            assert logging.getLogger("absl").level == logging.DEBUG  # restored
            warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        ours_compiles, tree, restored = _save_compiles(tmp_path, devices8, 111)
    finally:
        ocp.type_handlers.register_type_handler(jax.Array, original, override=True)
    assert default_compiles >= 6 and ours_compiles == 0, (default_compiles, ours_compiles)
    assert not warned, warned  # Orbax's "... overriding jax.Array"
    for k in tree:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(tree[k]))


@pytest.mark.parametrize("mode, kept", [("min", [3, 5]), ("max", [5])])
def test_checkpoints_kept_by_held_out_metric(mode, kept):
    """Orbax's policy from config: the max_to_keep latest plus the best evaluated checkpoint;
    one without metrics is not ranked, and a NaN ranks worst in either mode (a NaN in the
    sort would make which checkpoint goes arbitrary)."""
    import datetime
    from types import SimpleNamespace

    held_out = train.HeldOut(data=None, source=None, batches=1, every_steps=1, seed=0,
                             x0_terms=False, images=0, best_metric="loss", best_mode=mode)
    options = train.checkpoint_options({"max_to_keep": 1, "keep_period": 0}, held_out)
    losses = {1: 2.0, 2: float("nan"), 3: 1.0, 4: None, 5: 3.0}
    infos = [SimpleNamespace(step=s, time=datetime.datetime.now(),
                             metrics=None if v is None else {"loss": v, "bpp": 0.1})
             for s, v in losses.items()]
    keep = options.preservation_policy.should_preserve(
        infos, context=ocp.checkpoint_managers.PreservationContext())
    assert [s for s, k in zip(losses, keep) if k] == kept
    assert options.best_mode == mode
    plain = train.checkpoint_options({"max_to_keep": 2, "keep_period": 2}, None)
    assert plain.best_fn is None
    keep = plain.preservation_policy.should_preserve(
        infos, context=ocp.checkpoint_managers.PreservationContext())
    assert [s for s, k in zip(losses, keep) if k] == [2, 4, 5]  # keep_period 2 + latest 2


def test_microbatched_steps_make_the_whole_batch_update_with_less_memory(devices8):
    """``train.microbatches``: the batch (32 images sharded over 8 devices) in 2 or 4 parts
    summed by one lax.scan gives the whole batch's update, metrics and grad_norm (the
    mbt2018-mean loss with rounded latents draws nothing at random, so they must agree up to
    float rounding), and the compiled step holds less temporary memory."""
    from fasdiff_jax.models import train_step

    model = H.TrainableHyperprior.from_config({"N": 8, "M": 12, "lmbda": 0.01})
    mesh = sharding.create_mesh({"data": 8})
    replicated = jax.sharding.NamedSharding(mesh, P())
    params = jax.device_put(model.init_params(jax.random.key(0)), replicated)
    optimizer = optax.adam(1e-3)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    images = np.asarray(jax.random.randint(jax.random.key(1), (32, 64, 64, 3), 0, 256), np.uint8)
    batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh, 4))}
    rng = jax.random.key(2)
    out, temp = {}, {}
    for k in (1, 2, 4):
        step = train_step.make_train_step(lambda p, b, r: model.loss_fn(p, b, r, "round"),
                                          model.split, optimizer, mesh, donate=False,
                                          microbatches=k)
        temp[k] = step.lower(params, opt_state, batch, rng).compile().memory_analysis().temp_size_in_bytes
        out[k] = jax.device_get(step(params, opt_state, batch, rng))
    for k in (2, 4):
        for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[k])):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-7)
    assert out[1][2]["grad_norm"] > 0 and not np.allclose(
        jax.tree.leaves(out[1][0])[0], jax.tree.leaves(params)[0])  # a real update
    assert temp[4] < temp[2] < temp[1], temp
    with pytest.raises(ValueError, match="does not split into 3"):
        train_step.split_microbatches(batch["image"], 3)
    cfg = _config("embedded:train", **{"train.microbatches": 3})
    with pytest.raises(train.TrainConfigError, match="8 per shard, which does not split into 3"):
        train._check_microbatches(cfg, sharding.create_mesh({"data": 1}, devices=devices8[:1]), 3)
    cfg.train.microbatches = 0
    with pytest.raises(train.TrainConfigError, match="microbatches must be >= 1"):
        train.train_settings(cfg)


def test_a_program_key_names_what_the_step_programs_bake_in(devices8, tmp_path):
    """A later run in the same process reuses the jitted steps only when nothing they are
    built from changed (the scenario's resume and NaN runs check the reused steps' results)."""
    mesh = sharding.create_mesh({"data": 8})

    def key(on=mesh, held=None, **fields):
        c = _config("embedded:train", **fields)
        return train._program_key(c, train.train_settings(c), on, tuple(c.logical_axis_rules),
                                  held)

    base = key()
    for path, value in [("train.log_every", 7), ("train.checkpoint_every", 5), ("train.steps", 9),
                        ("train.learning_rate", 0.5),  # optimizer state, not program
                        ("train.x0_every", 3), ("train.on_process_count_change", "restart_data")]:
        assert key(**{path: value}) == base, path
    for path, value in [("train.grad_clip_norm", 1.0), ("train.microbatches", 2),
                        ("train.ema_decay", 0.7), ("train.optimizer", "adamw"),
                        ("train.lr_multipliers.controlnet", 0.25), ("model.compressor.N", 8),
                        ("model.loss.lpips", 0.0), ("model.sampler.steps", 2)]:
        assert key(**{path: value}) != base, path
    # a schedule is part of the program: then the rate and the step count are too
    cosine = key(**{"train.schedule": "warmup_cosine"})
    assert cosine != base
    assert key(**{"train.schedule": "warmup_cosine", "train.learning_rate": 2e-3}) != cosine
    # other devices (or another order of them), or other held-out steps
    assert key(on=sharding.create_mesh({"data": 8}, devices=devices8[::-1])) != base
    held = train.HeldOut(None, None, 1, 3, 0, True, 4)
    assert key(held=held) != base
    assert key(held=held) != key(held=dataclasses.replace(held, images=0))
    # converted SD weights by content: their config files shape the model, so other ones
    # in the same folder make another key
    first = key(**{"model.sd_checkpoint": str(_converted_sd(tmp_path / "sd"))})
    moved = shutil.copytree(tmp_path / "sd", tmp_path / "elsewhere")
    assert key(**{"model.sd_checkpoint": str(moved)}) == first  # the same weights elsewhere
    shutil.rmtree(tmp_path / "sd")
    _converted_sd(tmp_path / "sd", seed=4)
    assert key(**{"model.sd_checkpoint": str(tmp_path / "sd")}) != first


def test_only_tensorstores_unretrieved_read_errors_are_dropped():
    """asyncio's "Task exception was never retrieved" for a TensorStore read awaited through
    asyncio's own wrapper has no Orbax or TensorStore frame, only TensorStore's message."""
    def record(message: str) -> logging.LogRecord:
        try:
            raise ValueError(message)
        except ValueError:
            info = sys.exc_info()
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                                 "Task exception was never retrieved", None, info)

    read = ("DATA_LOSS: Error reading local file \"/w/checkpoints/30/state/d/x\" "
            "[tensorstore_spec='{\"driver\":\"zarr\",\"recheck_cached_data\":false}']")
    assert train._is_orbax_unretrieved_task(record(read))
    assert not train._is_orbax_unretrieved_task(record("our own task failed"))


def test_held_out_settings(embedded_dirs):  # noqa: F811
    """config.eval: off when unset, empty or after the last step; the whole batches of the
    held-out source, capped by num_batches; what cannot work is refused at the start."""

    mesh8 = sharding.create_mesh({"data": 8})
    mesh2 = sharding.create_mesh({"data": 2, "tensor": 4})  # batch split over 2 shards
    cfg = tiny.get_config()
    cfg.eval.source = f"prepared:{embedded_dirs['heldout']}"  # 9 images
    assert train.held_out_settings(cfg, mesh8, 99) is None  # every 100 steps, run ends at 99
    held = train.held_out_settings(cfg, mesh8, 100)
    assert (held.batches, held.data.global_batch_size, held.x0_terms, held.images) == (
        1, 8, True, 4)
    assert not held.data.shuffle and not held.data.augment and held.data.num_epochs == 1
    assert held.data.image_size == cfg.data.image_size
    cfg.eval.batch_size = 2
    held = train.held_out_settings(cfg, mesh2, 100)
    assert (held.batches, held.images) == (4, 2)  # 9 // 2 batches; pictures: one batch's
    cfg.eval.num_batches = 3
    assert train.held_out_settings(cfg, mesh2, 100).batches == 3
    with pytest.raises(train.TrainConfigError, match="not divisible by the 8 shards"):
        train.held_out_settings(cfg, mesh8, 100)
    cfg.eval.batch_size = 16
    with pytest.raises(train.TrainConfigError, match="9 images, fewer than one batch of 16"):
        train.held_out_settings(cfg, mesh8, 100)
    cfg.eval.source = "prepared:/nonexistent/faces"
    with pytest.raises(DataError):
        train.held_out_settings(cfg, mesh8, 100)
    cfg.eval.source = ""
    assert train.held_out_settings(cfg, mesh8, 100) is None
    with cfg.unlocked():
        cfg.eval.every = 5
    with pytest.raises(train.TrainConfigError, match=r"unknown fields \['every'\]"):
        train.held_out_settings(cfg, mesh8, 100)
    del cfg.eval
    assert train.held_out_settings(cfg, mesh8, 100) is None  # a run config from before eval


def test_params_are_checked_before_saving():
    good = {"compressor": {"w": jnp.ones(3)}, "hlfe": {"b": jnp.zeros(2)}}
    train._check_params_finite(good, 5)
    bad = {"compressor": {"w": jnp.array([1.0, jnp.nan, 0.0])}, "hlfe": {"b": jnp.zeros(2)}}
    with pytest.raises(NonFiniteLossError, match="after step 5.*compressor/w") as e:
        train._check_params_finite(bad, 5)
    assert e.value.terms == ("params",)


def test_optimizer_schedule_clipping_and_config_hyperparams():
    tc = train.train_settings(tiny.get_config())
    tc.update(optimizer="adamw", weight_decay=0.1, schedule="warmup_cosine", warmup_steps=2,
              steps=10, end_learning_rate_ratio=0.1, grad_clip_norm=0.5, learning_rate=0.01)
    opt = train.make_optimizer(tc)
    params = {"w": jnp.array([1.0, -2.0])}
    state = opt.init(params)
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 0.01, 2, 10, 0.001), weight_decay=0.1))
    ref_state = ref.init(params)
    for i in range(4):
        g = {"w": jnp.array([3.0, 4.0]) * (i + 1)}
        u, state = opt.update(g, state, params)
        ru, ref_state = ref.update(g, ref_state, params)
        # f32 hyper-parameters in the state (inject_hyperparams) vs Python floats: ~1e-5 rel
        np.testing.assert_allclose(u["w"], ru["w"], rtol=1e-4, atol=1e-9)
    assert float(train.hyperparams(state)["learning_rate"]) == pytest.approx(
        optax.warmup_cosine_decay_schedule(0.0, 0.01, 2, 10, 0.001)(3))
    mesh = sharding.create_mesh({"data": -1})
    tc.update(learning_rate=0.25, b1=0.5)  # a schedule's rate is not overwritten, b1 is
    state = train.set_hyperparams(state, tc, mesh)
    assert float(train.hyperparams(state)["b1"]) == 0.5
    assert float(train.hyperparams(state)["learning_rate"]) != 0.25
    tc.update(schedule="constant", optimizer="adam")
    opt = train.make_optimizer(tc)
    state = train.set_hyperparams(opt.init(params), {**tc, "learning_rate": 0.5}, mesh)
    assert float(train.hyperparams(state)["learning_rate"]) == 0.5
    u, _ = opt.update({"w": jnp.array([1.0, 1.0])}, state, params)  # clipped to norm 0.5
    np.testing.assert_allclose(u["w"], [-0.5, -0.5], rtol=1e-5)  # Adam's first step: -lr*sign


def test_params_ema_is_the_bias_corrected_average_of_the_iterates(devices8):
    """``train.ema_decay``: the optimizer state carries the average of the params after each
    update weighted by decay^(t-i) and normalised: the first step's params exactly, then
    float64's weighted mean of the iterates to 1e-6; the updates are the inner optimizer's,
    and the average is sharded like its params."""
    tc = train.train_settings(tiny.get_config())
    tc.update(schedule="constant", learning_rate=0.1, ema_decay=0.9)
    opt = train.make_optimizer(tc)
    plain = train.make_optimizer({**tc, "ema_decay": 0.0})
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(3)}
    state, plain_state = opt.init(params), plain.init(params)
    assert train.ema_params(plain_state) is None
    iterates = []
    for t in range(1, 7):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        u, state = opt.update(g, state, params)
        pu, plain_state = plain.update(g, plain_state, params)
        jax.tree.map(np.testing.assert_array_equal, u, pu)  # the inner optimizer's updates
        params = optax.apply_updates(params, u)
        iterates.append(jax.tree.map(lambda p: np.asarray(p, np.float64), params))
        weights = 0.9 ** np.arange(t - 1, -1, -1.0)
        want = jax.tree.map(lambda *ps: np.tensordot(weights, np.stack(ps), 1) / weights.sum(),
                            *iterates)
        got = train.ema_params(state)
        if t == 1:
            jax.tree.map(np.testing.assert_array_equal, got, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     got, want)
    assert int(state.count) == 6
    assert not np.allclose(train.ema_params(state)["w"], params["w"], atol=1e-3)  # it lags
    assert float(train.hyperparams(state)["learning_rate"]) == pytest.approx(0.1)
    mesh = sharding.create_mesh({"data": 8})
    state = train.set_hyperparams(state, {**tc, "learning_rate": 0.5}, mesh)
    assert float(train.hyperparams(state)["learning_rate"]) == 0.5
    sh = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
    o_sh = train._opt_shardings(opt, jax.eval_shape(opt.init, params), sh, mesh)
    assert train.ema_params(o_sh) == sh and o_sh.count.spec == P()
    for bad in (1.0, -0.1):
        cfg = tiny.get_config()
        cfg.train.ema_decay = bad
        with pytest.raises(train.TrainConfigError, match=r"ema_decay must be in \[0, 1\)"):
            train.train_settings(cfg)


def test_lr_multipliers_scale_each_components_updates_without_state():
    """``train.lr_multipliers``: a component's updates are the plain optimizer's times its
    factor (0: it stays), the others' unchanged; the optimizer state has the plain one's
    structure (so the factors may change between resumes); unknown components and negative
    factors are refused, naming the trainable ones."""
    tc = train.train_settings(tiny.get_config())
    tc.update(optimizer="adamw", weight_decay=0.1, learning_rate=0.01, grad_clip_norm=1.0)
    rng = np.random.default_rng(1)
    params = {k: {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
              for k in ("compressor", "hlfe", "controlnet")}
    for ema in (0.0, 0.9):
        plain = train.make_optimizer({**tc, "ema_decay": ema})
        scaled = train.make_optimizer({**tc, "ema_decay": ema,
                                       "lr_multipliers": {"controlnet": 0.25, "hlfe": 0.0}})
        s_plain, s_scaled = plain.init(params), scaled.init(params)
        assert jax.tree.structure(s_plain) == jax.tree.structure(s_scaled)
        for _ in range(3):
            g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
            u, s_plain = plain.update(g, s_plain, params)
            v, s_scaled = scaled.update(g, s_scaled, params)
            np.testing.assert_array_equal(v["compressor"]["w"], u["compressor"]["w"])
            np.testing.assert_allclose(v["controlnet"]["w"], 0.25 * u["controlnet"]["w"], rtol=1e-6)
            assert not np.any(v["hlfe"]["w"]) and np.any(u["hlfe"]["w"])
    tc["lr_multipliers"] = {"unet": 0.1}
    with pytest.raises(train.TrainConfigError, match=r"\['unet'\] are not trainable components "
                       r"of this model; they are \['compressor', 'controlnet', 'hlfe'\]"):
        train._check_lr_multipliers(tc, params)
    tc["lr_multipliers"] = {"hlfe": -1.0}
    with pytest.raises(train.TrainConfigError, match="lr_multipliers.hlfe must be a number >= 0"):
        train._check_lr_multipliers(tc, params)


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in key_path)


def test_param_shardings_follow_the_logical_rules(devices8):
    cfg = tiny.get_config()
    model = fasdiff.build(cfg.model)
    params = model.init_params(jax.random.key(0))
    mesh = sharding.create_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    sh = train.param_shardings(model, params, mesh, tuple(cfg.logical_axis_rules))
    specs = {_path(k): s.spec for k, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
    assert specs.keys() == {_path(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    # CONV_KERNEL_AXES = (conv_h, conv_w, embed -> fsdp, mlp -> tensor)
    assert specs["unet/down_blocks_1/resnets_0/conv1/kernel"] == P(None, None, "fsdp", "tensor")
    for comp in ("compressor", "hlfe", "controlnet", "vae"):
        assert any(s != P() for k, s in specs.items() if k.startswith(comp + "/")), comp
    assert specs["null_text"] == P()
    opt = train.make_optimizer(train.train_settings(cfg))
    train_sh = fasdiff.FaSDiff.split(sh)[0]
    o_sh = train._opt_shardings(opt, jax.eval_shape(lambda p: model.init_opt_state(opt, p),
                                                    params), train_sh, mesh)
    adam = o_sh.inner_state[0]
    assert jax.tree.leaves(adam.mu) == jax.tree.leaves(train_sh)  # moments follow their params
    assert jax.tree.leaves(adam.nu) == jax.tree.leaves(train_sh)
    assert o_sh.hyperparams["learning_rate"].spec == P()


def _converted_sd(ckpt: Path, seed: int = 3) -> Path:
    """A folder as ``python -m fasdiff_jax.convert`` writes it, with configs/tiny.py's SD
    shapes and random weights."""
    cfg = tiny.get_config()
    base = fasdiff.build(cfg.model)
    for name, mod in (("unet", base.unet), ("vae", base.vae)):
        convert.save_component(str(ckpt / name), dict(cfg.model[name]),
                               convert.random_params(mod, seed))
    null = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    safetensors_io.save_file({"null_text": null}, ckpt / convert.NULL_TEXT_FILE)
    return ckpt


def test_sd_checkpoint_weights_go_from_the_file_into_their_shards(devices8, tmp_path):
    """Loaded SD parts stay host numpy (memory-mapped) until the train loop's device_put puts
    each device's shard in place: no device holds a staging copy of a whole weight."""
    cfg = tiny.get_config()
    base = fasdiff.build(cfg.model)
    ckpt = _converted_sd(tmp_path / "ckpt")
    null = safetensors_io.load_file(ckpt / convert.NULL_TEXT_FILE)["null_text"]
    cfg.model.sd_checkpoint = str(ckpt)
    model = fasdiff.build(cfg.model)
    params = model.init_params(jax.random.key(0))
    for comp in ("unet", "vae", "controlnet", "null_text"):
        leaves = jax.tree.leaves(params[comp])
        assert leaves and not any(isinstance(x, jax.Array) for x in leaves), comp
    np.testing.assert_array_equal(params["null_text"], null)
    mesh = sharding.create_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    placed = jax.device_put(params, train.param_shardings(model, params, mesh,
                                                          tuple(cfg.logical_axis_rules)))
    for comp in ("unet", "controlnet"):  # the ControlNet's own copy of the UNet encoder
        host = params[comp]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
        arr = placed[comp]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
        assert arr.sharding.spec == P(None, None, "fsdp", "tensor")
        assert len(arr.addressable_shards) == 8
        for shard in arr.addressable_shards:
            assert shard.data.size == host.size // 8
            np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    np.testing.assert_array_equal(
        np.asarray(placed["controlnet"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]),
        convert.random_params(base.unet, 3)["down_blocks_1"]["resnets_0"]["conv1"]["kernel"])


def test_codec_and_evaluate_commands_do_not_import_tensorflow():
    """Only training writes TF summaries; the codec and evaluate commands (which import
    ``train`` for ``restore_for_inference``) would otherwise start ~10 s slower."""
    code = ("import sys; import fasdiff_jax.codec, fasdiff_jax.evaluate, fasdiff_jax.train; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.stdout.strip() == "[]", out.stdout[:300]


def test_bad_configs_are_refused_early(tmp_path):
    cfg = tiny.get_config()
    cfg.train.optimizer = "sgd"
    with pytest.raises(train.TrainConfigError, match="optimizer"):
        train.train_and_evaluate(cfg, str(tmp_path))
    cfg = tiny.get_config()
    with cfg.unlocked():
        cfg.train.lr = 1.0
    with pytest.raises(train.TrainConfigError, match=r"unknown fields \['lr'\]"):
        train.train_settings(cfg)
    cfg = tiny.get_config()
    cfg.train.on_process_count_change = "ignore"
    with pytest.raises(train.TrainConfigError, match="on_process_count_change"):
        train.train_settings(cfg)
    with pytest.raises(train.TrainConfigError, match="sd_checkpoint is required"):
        train.train_and_evaluate(celeba.get_config(), str(tmp_path))
    # model fields that failed only inside Flax's init or the sampler, naming no field
    for field, value, message in (
            ("compressor.groups", 5,
             "compressor.groups=5 must divide config.model.compressor.N=16"),
            ("hlfe.groups", 3, "hlfe.groups=3 must divide config.model.hlfe.features=16"),
            ("hlfe.heads", 3, "hlfe.heads=3 must divide config.model.hlfe.features=16"),
            ("loss.stage", 3, "loss.stage must be 1 or 2, got 3"),
            ("sampler.steps", 0, "sampler: sampler spec out of range"),
            ("sampler.t_start", 1000, "sampler: sampler spec out of range")):
        cfg = tiny.get_config()
        part, key = field.split(".")
        cfg.model[part][key] = value
        with pytest.raises(train.TrainConfigError, match=re.escape(f"config.model.{message}")):
            train.train_and_evaluate(cfg, str(tmp_path))
    # values that trained silently (a negative weight or rate maximised its term, the top-level
    # compute_dtype was never read) or failed in a traceback naming no field
    for path, value, message in (
            ("model.loss.rate", -1.0, "model.loss.rate must be a finite number >= 0, got -1.0"),
            ("model.loss.lpips", float("nan"), "model.loss.lpips must be a finite number >= 0"),
            ("model.loss.x0_max_timestep", -1, "model.loss.x0_max_timestep must be an integer >= 0"),
            ("model.loss.hf_levels", 0, "model.loss.hf_levels must be an integer in 1..3, got 0"),
            ("model.loss.hf_levels", 4, "model.loss.hf_levels must be an integer in 1..3, got 4"),
            ("model.compressor.dwt_levels", 4, "model.compressor.dwt_levels must be an integer "
                                               "in 0..3, got 4"),
            ("model.hlfe.dwt_levels", 4, "model.hlfe.dwt_levels must be an integer in 0..3"),
            ("model.compressor.N", 0, "model.compressor.N must be an integer >= 1, got 0"),
            ("model.sampler.seed", -1, "model.sampler: sampler seed must be in 0..2**64-1"),
            ("model.compute_dtype", "float17", "model.compute_dtype must be one of ('float32', "),
            ("model.attention_impl", "flash", "model.attention_impl must be one of ('xla', "),
            ("model.lpips_net", "vgg17", "model.lpips_net must be one of ('alexnet', 'vgg16')"),
            ("train.learning_rate", -1e-3, "train.learning_rate must be a finite number > 0"),
            ("train.b1", 1.5, "train.b1 must be in [0, 1), got 1.5"),
            ("train.grad_clip_norm", -1.0, "train.grad_clip_norm must be a finite number >= 0"),
            ("mesh.data", 3, "mesh: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices"),
            ("mesh.fsdp", 0, "mesh: mesh axis 'fsdp' must be a positive size or -1 (the devices "
                             "left), got 0"),  # was a ZeroDivisionError traceback
            ("mesh.tensor", -8, "mesh: mesh axis 'tensor' must be a positive size or -1"),
            ("compute_dtype", "bfloat16", "compute_dtype='bfloat16' is not read: the model's is "
                                          "config.model.compute_dtype ('float32')")):
        cfg = tiny.get_config()
        *parents, key = path.split(".")
        with cfg.unlocked():
            functools.reduce(getattr, parents, cfg)[key] = value
        with pytest.raises(train.TrainConfigError, match=re.escape(f"config.{message}")):
            train.train_and_evaluate(cfg, str(tmp_path))
    # a stream of fewer batches than steps ended the run in a bare StopIteration at its end
    cfg = tiny.get_config()
    cfg.data.num_epochs = 1
    with pytest.raises(train.TrainConfigError, match=re.escape(
            "config.data.num_epochs=1 gives 3 batches of 8 (29 records), but "
            "config.train.steps=200 takes one a step")):
        train.train_and_evaluate(cfg, str(tmp_path))
    cfg.data.num_epochs = 0
    with pytest.raises(DataError, match="num_epochs must be an integer >= 1, or None"):
        train.train_and_evaluate(cfg, str(tmp_path))
    cfg = mbt2018_mean.get_config()
    cfg.model.lmbda = -0.01
    with pytest.raises(train.TrainConfigError, match=r"config.model.lmbda must be a finite number"):
        train.train_and_evaluate(cfg, str(tmp_path))
    # crops the model cannot take whole (they failed inside the step's trace, unreadably)
    for name, size, near in (("tiny", 72, "64 or 128"), ("tiny", 100, "64 or 128"),
                             ("tiny", 32, "64"), ("mbt2018_mean", 200, "192 or 256")):
        cfg = importlib.import_module(f"configs.{name}").get_config()
        cfg.model.image_size = size
        with pytest.raises(train.TrainConfigError,
                           match=f"image_size={size} is not a multiple of 64.*; use {near}$"):
            train.train_and_evaluate(cfg, str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before writing anything


def _main_exit_code(config: str, workdir, raises: BaseException | None = None) -> int:
    """``python -m fasdiff_jax.main --config=configs/CONFIG --workdir=WORKDIR`` in this
    process (training replaced by ``raises`` where given): its exit status."""
    from fasdiff_jax import main as main_lib

    argv = ["main", f"--config={ROOT / 'configs' / config}", f"--workdir={workdir}"]
    with mock.patch.object(sys, "argv", argv):
        main_lib.FLAGS(argv)
    try:
        with contextlib.ExitStack() as stack:
            if raises is not None:
                stack.enter_context(mock.patch.object(train, "train_and_evaluate",
                                                      side_effect=raises))
            with pytest.raises(SystemExit) as stop:
                main_lib.main(argv[:1])
    finally:
        main_lib.FLAGS.unparse_flags()
    return stop.value.code


def test_main_reports_our_errors_as_one_line(tmp_path, capsys):
    """``python -m fasdiff_jax.main`` with a config the user must fix: exit status 2 and the
    typed error's message on stderr, no traceback."""
    assert _main_exit_code("celeba.py", tmp_path / "w") == 2
    err = capsys.readouterr().err
    assert "error: TrainConfigError: config.model.sd_checkpoint is required" in err
    assert "Traceback" not in err


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    for workdir in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(train.TrainConfigError,
                           match=re.escape(f"workdir {workdir}: {tmp_path / 'f'} is a file, not a folder")):
            train.train_and_evaluate(tiny.get_config(), str(workdir))


def test_main_reports_running_out_of_memory_with_what_to_change(tmp_path, capsys):
    """XLA's allocation failure (injected here; on a pod a too-large batch) ends ``main`` with
    exit status 2, its first line and the settings that shrink a step, not a traceback."""
    from fasdiff_jax import main as main_lib

    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                     "34359738368 bytes.\nBufferAssignment OOM Debugging.")
    assert _main_exit_code("tiny.py", tmp_path / "w", raises=oom) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: out of memory: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
        "34359738368 bytes.", main_lib.OOM_ADVICE]


def test_main_ends_a_second_ctrl_c_with_one_line_and_130(tmp_path, capsys):
    """The first Ctrl-C saves and stops (exit 130, see above); a second stops at once: it
    printed KeyboardInterrupt's traceback."""
    assert _main_exit_code("tiny.py", tmp_path / "w", raises=KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == ("interrupted at once, the step it was on not saved; "
                                       "rerun the same command to resume from the last "
                                       "checkpoint\n")


@pytest.mark.parametrize("override, message", [
    ("--config.train.stpes=20", "has no field config.train.stpes (did you mean config.train.steps?)"),
    ("--config.compute_dtype=bfloat16",
     "has no field config.compute_dtype (did you mean config.model.compute_dtype?)"),
    ("--config.data.source.x=1", "holds config.data.source as a value, not a section"),
])
def test_main_names_an_override_of_a_field_the_config_lacks(tmp_path, override, message):
    """A mistyped override used to end in config_flags' traceback with a bare
    ``AttributeError: "'stpes'"``; now one line naming the field and its nearest names."""
    work = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "fasdiff_jax.main", "--config=configs/tiny.py",
                           f"--workdir={work}", override], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {override.split('=')[0]}: configs/tiny.py "
                                                f"{message}"]
    assert not work.exists()


def test_main_names_an_override_of_the_wrong_type_with_exit_status_2(tmp_path):
    """absl's parser printed "FATAL Flags parsing error" and exited 1, where every other
    value the run cannot use is one ``error:`` line and exit status 2 (README)."""
    work = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "fasdiff_jax.main", "--config=configs/tiny.py",
                           f"--workdir={work}", "--config.train.steps=abc"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "steps=abc" in lines[0], lines
    assert not work.exists()


@pytest.mark.parametrize("source, message", [
    (None, "no such file"),
    ("def get_config(:\n", "SyntaxError"),
    ("def nothing():\n    pass\n", "defines no get_config()"),
    ("def get_config():\n    return 5\n", "must return an ml_collections ConfigDict"),
])
def test_main_names_a_config_file_that_gives_no_config(tmp_path, source, message):
    """config_flags ended these with a traceback and exit status 1 (a launch script once
    passed an override as the config: ``--config=--config.train.steps=3``)."""
    from fasdiff_jax import main as main_lib

    cfg = tmp_path / "cfg.py"
    if source is not None:
        cfg.write_text(source)
    got = main_lib.config_file_problem(str(cfg))
    assert got is not None and got.startswith(f"--config={cfg}: ") and message in got
    assert main_lib.config_file_problem(str(ROOT / "configs" / "tiny.py")) is None
    if source is None:  # the command: one line, exit 2, nothing written
        proc = subprocess.run([sys.executable, "-m", "fasdiff_jax.main", f"--config={cfg}",
                               f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {got}"]
        assert not (tmp_path / "w").exists()


def test_configs_load_by_path_from_any_directory(tmp_path):
    """``--config=/abs/path/configs/tiny.py`` from outside the checkout: the configs import
    their siblings (``configs.base``), which used to fail with ModuleNotFoundError there."""
    code = ("import sys\n"
            "from absl import flags\n"
            "from ml_collections import config_flags\n"
            "from fasdiff_jax.codec import load_config\n"
            "config_flags.DEFINE_config_file('config')\n"
            "flags.FLAGS(['main', '--config=' + sys.argv[1]])\n"
            "print(flags.FLAGS.config.model.image_size, load_config(sys.argv[2]).model.image_size)\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / "tiny.py"),
                          str(ROOT / "configs" / "celeba.py")], cwd=tmp_path, capture_output=True,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["64", "256"]


def _printed_with_config(code: str, name: str, tmp_path: Path):
    """The JSON that ``code`` prints last, run in a fresh process (main's flags are parsed once
    per process) with the path of ``configs/<name>.py`` as its argument."""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / f"{name}.py")],
                         cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", ["tiny", "celeba", "mbt2018_mean"])
def test_an_image_size_override_sets_the_model_and_its_data_alike(name, tmp_path):
    """One size in each shipped config: ``--config.data.image_size=128`` alone used to train
    on 128 px crops a model built, and evaluated on the embedded held-out faces, at 64 px."""
    code = ("import json, sys\n"
            "from fasdiff_jax import main\n"
            "path, sizes = sys.argv[1], []\n"
            "for field in ('model', 'data'):\n"
            "    sys.argv = ['main', '--config=' + path, '--workdir=w',\n"
            "                f'--config.{field}.image_size=128']  # config_flags reads it\n"
            "    main.FLAGS(sys.argv)\n"
            "    c = main.FLAGS.config\n"
            "    sizes.append([c.model.image_size, c.data.image_size])\n"
            "    main.FLAGS.unparse_flags()\n"
            "print(json.dumps(sizes))\n")
    assert _printed_with_config(code, name, tmp_path) == [[128, 128], [128, 128]]

    config = importlib.import_module(f"configs.{name}").get_config()
    config.data.image_size = 96
    train.save_run_config(config, str(tmp_path))
    saved = train.load_run_config(str(tmp_path))
    assert (saved.model.image_size, saved.data.image_size) == (96, 96)


@pytest.mark.parametrize("name", ["tiny", "celeba", "mbt2018_mean"])
def test_every_data_train_and_eval_field_can_be_overridden_in_each_config(name, tmp_path):
    """Each shipped config's ``data``, ``train`` and ``eval`` hold every field the loop reads:
    the configs used to list some, so ``--config.data.num_workers=4`` on mbt2018_mean (or
    ``augment`` on any, or ``eval.last_params_too`` on mbt2018_mean) was refused as a field the
    config lacks. Overrides of each kind reach ``DataConfig``."""
    from configs import base
    from fasdiff_jax.data.pipeline import DataConfig

    config = importlib.import_module(f"configs.{name}").get_config()
    assert set(config.data) == {f.name for f in dataclasses.fields(DataConfig)}
    assert set(config.train) == set(train.TRAIN_DEFAULTS)
    assert set(config.eval) == set(train.EVAL_DEFAULTS)
    code = ("import json, sys\n"
            "from fasdiff_jax import main\n"
            "from fasdiff_jax.data.pipeline import DataConfig\n"
            "sys.argv = ['main', '--config=' + sys.argv[1], '--workdir=w',\n"
            "            '--config.data.num_workers=4', '--config.data.augment=False',\n"
            "            '--config.data.crop_scale=(0.5,1.0)', '--config.data.num_epochs=3',\n"
            "            '--config.data.cache_dir=/c']  # config_flags reads it\n"
            "main.FLAGS(sys.argv)\n"
            "d = DataConfig.from_config(main.FLAGS.config)\n"
            "print(json.dumps([d.num_workers, d.augment, d.crop_scale, d.num_epochs, d.cache_dir]))\n")
    assert _printed_with_config(code, name, tmp_path) == [4, False, [0.5, 1.0], 3, "/c"]
    with pytest.raises(KeyError, match=r"no fields \['num_worker'\]"):
        base.data_config(num_worker=4)


def test_workdir_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
    assert train._workdir("gs://bucket/runs/celeba") == "gs://bucket/runs/celeba"
    monkeypatch.chdir(tmp_path)
    assert train._workdir("runs/a") == str(tmp_path / "runs" / "a")


@pytest.mark.xdist_group("train_scenario")  # one worker builds the scenario
def test_codec_and_evaluate_commands_use_the_trained_checkpoint(scenario, embedded_dirs,  # noqa: F811
                                                                tmp_path, capsys, caplog):
    """``fasdiff_jax.codec`` and ``fasdiff_jax.evaluate`` on the workdir trained above."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec, evaluate

    cfg, work = str(ROOT / "configs" / "tiny.py"), str(scenario["a"])
    Image.fromarray(skdata.astronaut()[20:81, 150:200]).save(tmp_path / "face.png")  # 61x50
    common = [f"--config={cfg}", f"--workdir={work}"]
    assert codec.main(["compress", str(tmp_path / "face.png"), str(tmp_path / "f.fsd"),
                       "--steps=2", "--seed=5"] + common) == 0
    assert codec.main(["decompress", str(tmp_path / "f.fsd"), str(tmp_path / "out.png")]
                      + common) == 0
    assert Image.open(tmp_path / "out.png").size == (50, 61)
    assert "does not exist" not in caplog.text  # no Orbax warning on a healthy checkpoint
    assert codec.main(["info", str(tmp_path / "f.fsd")]) == 0  # the header, without the model
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["codec"] == "fasdiff" and (info["height"], info["width"]) == (61, 50)
    assert info["sampler"]["steps"] == 2 and info["sampler"]["seed"] == 5
    (tmp_path / "bad.fsd").write_bytes((tmp_path / "f.fsd").read_bytes()[:-3])
    assert codec.main(["decompress", str(tmp_path / "bad.fsd"), str(tmp_path / "x.png")]
                      + common) == 2
    assert "error:" in capsys.readouterr().err
    assert codec.main(["compress", str(tmp_path / "face.png"), str(tmp_path / "g.fsd"),
                       f"--config={cfg}", f"--workdir={tmp_path / 'empty'}"]) == 2
    assert "no checkpoint" in capsys.readouterr().err

    out = tmp_path / "eval.json"
    assert evaluate.main(common + [f"--source=prepared:{embedded_dirs['heldout']}", "--limit=1",
                                   f"--out={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["name"] == "fasdiff@6" and len(res["images"]) == 1 and res["complete"]
    assert res["settings"]["checkpoint_step"] == 6 and res["settings"]["sampler"]["steps"] >= 1
    assert res["settings"]["fingerprint"] == info["fingerprint"]  # the weights its files carry
    row = res["images"][0]
    assert row["bpp"] == pytest.approx(8 * row["bytes"] / (row["height"] * row["width"]))
    assert np.isfinite(row["psnr-rgb"]) and 0 <= row["lpips"] and -1 <= row["identity-cos"] <= 1
    # the same command with a larger limit goes on from the saved rows (the first one is kept)
    assert evaluate.main(common + [f"--source=prepared:{embedded_dirs['heldout']}", "--limit=2",
                                   f"--out={out}"]) == 0
    res2 = json.loads(out.read_text())
    assert len(res2["images"]) == 2 and res2["images"][0] == row and res2["complete"]
    # --batch_size: the two images coded together, the same rows up to float rounding; the
    # unbatched file is not resumed with it (its settings differ)
    batched = tmp_path / "eval_batched.json"
    source = f"--source=prepared:{embedded_dirs['heldout']}"
    assert evaluate.main(common + [source, "--limit=2", "--batch_size=2", f"--out={batched}"]) == 0
    res3 = json.loads(batched.read_text())
    assert res3["settings"]["coding_batch_size"] == 2 and res3["complete"]
    for a, b in zip(res2["images"], res3["images"]):
        assert a["bytes"] == b["bytes"] and a["psnr-rgb"] == pytest.approx(b["psnr-rgb"], abs=0.05)
    capsys.readouterr()
    assert evaluate.main(common + [source, "--limit=3", "--batch_size=2", f"--out={out}"]) == 2
    assert "coding_batch_size differ" in capsys.readouterr().err


@pytest.mark.xdist_group("train_scenario")  # after the scenario: its programs are cached
def test_codec_and_evaluate_take_an_earlier_checkpoint(scenario, embedded_dirs, tmp_path,  # noqa: F811
                                                       capsys):
    """``--step`` picks one of a workdir's checkpoints (default: the latest); evaluate's JSON
    names it; a step the workdir does not have is one error line listing those it has."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec, evaluate

    a = scenario["a"]
    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:84, 150:214]).save(face)
    files = {}
    for step in (None, 3, 6):
        out = tmp_path / f"{step}.fsd"
        flags = [] if step is None else [f"--step={step}"]
        assert codec.main(["compress", str(face), str(out), f"--workdir={a}", *flags]) == 0
        files[step] = out.read_bytes()
    assert files[None] == files[6] != files[3]  # step 3's compressor: another fingerprint
    assert codec.main(["decompress", str(tmp_path / "3.fsd"), str(tmp_path / "3.png"),
                       f"--workdir={a}", "--step=3"]) == 0
    capsys.readouterr()
    assert codec.main(["decompress", str(tmp_path / "3.fsd"), str(tmp_path / "x.png"),
                       f"--workdir={a}"]) == 2  # the latest checkpoint refuses step 3's file
    assert "fingerprint" in capsys.readouterr().err
    assert codec.main(["compress", str(face), str(tmp_path / "y.fsd"), f"--workdir={a}",
                       "--step=4"]) == 2
    assert "no checkpoint of step 4; it has [3, 6]" in capsys.readouterr().err
    res = tmp_path / "eval3.json"
    assert evaluate.main([f"--workdir={a}", "--step=3", f"--source=prepared:{embedded_dirs['heldout']}",
                          "--limit=1", f"--out={res}"]) == 0
    assert json.loads(res.read_text())["settings"]["checkpoint_step"] == 3
    # step 3 exported for coding (codec export): the same file as from the run's workdir
    assert codec.main(["export", f"--workdir={a}", "--step=3", str(tmp_path / "export3")]) == 0
    assert codec.main(["compress", str(face), str(tmp_path / "e3.fsd"),
                       f"--workdir={tmp_path / 'export3'}"]) == 0
    assert (tmp_path / "e3.fsd").read_bytes() == files[3]


def _flip_data_bytes(step_dir: Path) -> None:
    """XOR 32 bytes in the middle of each data file over 10 kB of a checkpoint's state."""
    flipped = 0
    for f in step_dir.glob("state/ocdbt.process_*/d/*"):
        data = bytearray(f.read_bytes())
        if len(data) > 10_000:
            mid = len(data) // 2
            data[mid:mid + 32] = bytes(b ^ 0xFF for b in data[mid:mid + 32])
            f.write_bytes(bytes(data))
            flipped += 1
    assert flipped


@pytest.mark.xdist_group("train_scenario")
def test_flipped_bytes_in_a_checkpoint_are_found(scenario, tmp_path, capsys, monkeypatch):
    """Orbax/TensorStore keep no checksum of array data: bytes flipped inside a checkpoint's
    data files were read back as other weights and coded with, silently. Each checkpoint's
    meta keeps checksums of its params, their moving average and the optimizer state; the
    codec, export and a resume refuse a checkpoint whose arrays differ from them, by name."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec
    from fasdiff_jax.errors import CheckpointError

    meta = json.loads((scenario["a"] / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert set(meta["sums"]) == {"params", "ema_params", "opt_state"}
    assert len(meta["sums"]["params"]) == len(meta["sums"]["ema_params"]) > 100
    # an export holds only params: every data file flipped is in them
    export = tmp_path / "export"
    assert codec.main(["export", f"--workdir={scenario['a']}", "--weights=params",
                       str(export)]) == 0
    _flip_data_bytes(export / "checkpoints" / "6")
    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:84, 150:214]).save(face)
    config = train.load_run_config(str(export))
    with monkeypatch.context() as m:  # without the checksums: read back as other weights
        m.setattr(train, "_check_sums", lambda *args, **kwargs: None)
        damaged = train.restore_for_inference(config, str(export)).params
    intact = train.restore_for_inference(config, str(scenario["a"]), weights="params").params
    # (in whichever trained part the flipped bytes land: which leaves share a data file
    # varies between runs; the compressor alone came out equal in one clean-clone CI run)
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(damaged),
                                                        jax.tree.leaves(intact)))
    compress = ["compress", str(face), str(tmp_path / "f.fsd"), f"--workdir={export}"]
    for argv in (compress, ["export", f"--workdir={export}", str(tmp_path / "again")]):
        assert codec.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{export}: checkpoint 6 is damaged: params " in err
        assert "differ from the checksums" in err
    assert not (tmp_path / "f.fsd").exists() and not (tmp_path / "again").exists()
    # the run's own checkpoint: a resume checks params and optimizer state
    work = tmp_path / "run"
    shutil.copytree(scenario["a"], work)
    _flip_data_bytes(work / "checkpoints" / "6")
    # refused by the checksums, or earlier where the flip lands in a zstd-compressed chunk
    # (which chunks are compressed varies between runs: this failed CI once at bc1253a)
    with pytest.raises(CheckpointError, match="checkpoint 6 (is damaged|cannot be read)"):
        train.train_and_evaluate(_config(scenario["source"], **{"train.steps": 8}), str(work))


@pytest.mark.xdist_group("train_scenario")
def test_a_resume_at_or_past_the_last_step_trains_nothing_and_keeps_the_config(
        scenario, tmp_path, caplog):
    """It said nothing and saved its config (train.steps=4) over the run's (6)."""
    work = tmp_path / "run"
    shutil.copytree(scenario["a"], work)
    saved = (work / "config.json").read_text()
    with caplog.at_level(logging.WARNING):
        out = train.train_and_evaluate(_config(scenario["source"], **{"train.steps": 4}),
                                       str(work))
    assert out == {"step": 6} and _steps(work) == [3, 6]
    assert (work / "config.json").read_text() == saved
    assert "checkpoint 6 of" in caplog.text
    assert "config.train.steps=4: nothing to train" in caplog.text


@pytest.mark.xdist_group("train_scenario")
def test_commands_rebuild_the_model_from_the_runs_saved_config(scenario, tmp_path, capsys):
    """``main`` saves its config, command-line overrides included, as ``workdir/config.json``;
    the codec and evaluate commands use it when ``--config`` is left out."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec

    a = scenario["a"]
    saved = train.load_run_config(str(a))
    want = _config(scenario["source"], **{"train.steps": 6, "model.sampler.steps": 3,
                                          **scenario["held"]})
    assert saved.to_dict() == want.to_dict()  # tuples come back as tuples
    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:81, 150:200]).save(face)
    assert codec.main(["compress", str(face), str(tmp_path / "f.fsd"), f"--workdir={a}"]) == 0
    assert codec.main(["info", str(tmp_path / "f.fsd")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["sampler"]["steps"] == 3  # the run's override, not configs/tiny.py's 4
    assert codec.main(["decompress", str(tmp_path / "f.fsd"), str(tmp_path / "o.png"),
                       f"--workdir={a}"]) == 0
    assert Image.open(tmp_path / "o.png").size == (50, 61)

    # --config names another config: one whose frozen weights differ is refused with a hint
    other = tmp_path / "seed1.py"
    other.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom configs import tiny\n\n\n"
                     f"def get_config():\n    c = tiny.get_config()\n    c.seed = 1\n    return c\n")
    assert codec.main(["compress", str(face), str(tmp_path / "g.fsd"), f"--workdir={a}",
                       f"--config={other}"]) == 2
    err = capsys.readouterr().err
    assert "other frozen SD weights" in err and "without --config" in err
    # a workdir without a readable config.json: one readable line, nothing written
    bare = tmp_path / "bare"
    shutil.copytree(a / "checkpoints", bare / "checkpoints")
    for content, message in ((None, "no config.json"), ("{", "not a readable config")):
        if content is not None:
            (bare / "config.json").write_text(content)
        assert codec.main(["compress", str(face), str(tmp_path / "g.fsd"),
                           f"--workdir={bare}"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "g.fsd").exists()


@pytest.mark.xdist_group("train_scenario")
def test_coding_needs_no_loss_networks(scenario, tmp_path):
    """A training-time file (``model.identity_path``, dlib's network for the identity loss)
    missing where files are coded: the codec does not load it and codes the same bytes."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec

    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:81, 150:200]).save(face)
    moved = tmp_path / "w"
    shutil.copytree(scenario["a"], moved)
    saved = json.loads((moved / "config.json").read_text())
    assert saved["model"]["loss"]["identity"] > 0 and saved["model"]["loss"]["lpips"] > 0
    saved["model"]["identity_path"] = str(tmp_path / "gone" / "dlib_face_recognition.dat")
    (moved / "config.json").write_text(json.dumps(saved))
    with pytest.raises(IdentityWeightsError):  # what training (the loss) would need
        fasdiff.build(train.load_run_config(str(moved)).model)
    for work, out in ((scenario["a"], "a.fsd"), (moved, "b.fsd")):
        assert codec.main(["compress", str(face), str(tmp_path / out), f"--workdir={work}"]) == 0
    assert (tmp_path / "a.fsd").read_bytes() == (tmp_path / "b.fsd").read_bytes()
    model, _, _, _ = train.restore_for_inference(train.load_run_config(str(moved)), str(moved))
    assert model.identity is None and model.lpips is None


@pytest.mark.xdist_group("train_scenario")
def test_resuming_a_workdir_as_another_model_kind_is_refused(scenario, tmp_path):
    """The mbt2018-mean config on a FaSDiff workdir: refused by the frozen fingerprint before
    Orbax sees the other tree; the workdir's config.json is left as it was."""
    from test_baseline_training import small_config

    work = tmp_path / "w"
    shutil.copytree(scenario["a"], work)
    before = (work / "config.json").read_text()
    with pytest.raises(train.TrainConfigError, match="another model kind"):
        train.train_and_evaluate(small_config(scenario["source"]), str(work))
    assert (work / "config.json").read_text() == before


@pytest.mark.xdist_group("train_scenario")
def test_a_fasdiff_run_does_not_export_as_the_baseline(scenario, tmp_path, capsys):
    assert convert.main(["--hyperprior_workdir", str(scenario["a"]), "--out", str(tmp_path / "x")]) == 2
    assert "FaSDiff run, not the mbt2018-mean baseline" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.xdist_group("train_scenario")  # its train step: compiled by the scenario
def test_a_run_on_converted_sd_weights_loads_wherever_they_are_copied(scenario, tmp_path,
                                                                      capsys):
    """Checkpoints name their frozen SD weights by content (not by the folder's path): the
    codec on another machine takes the folder's new place with --sd_checkpoint and codes the
    same bytes; a resumed run takes it from its config; other weights are refused."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec

    ckpt = _converted_sd(tmp_path / "machine_a" / "sd")
    work = tmp_path / "w"
    cfg = _config(scenario["source"], **{"train.steps": 1, "model.sd_checkpoint": str(ckpt),
                                          "model.sampler.steps": 2})
    train.train_and_evaluate(cfg, str(work))
    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:81, 150:200]).save(face)
    assert codec.main(["compress", str(face), str(tmp_path / "a.fsd"), f"--workdir={work}"]) == 0

    moved = tmp_path / "machine_b" / "weights"
    moved.parent.mkdir()
    shutil.move(ckpt, moved)
    assert codec.main(["compress", str(face), str(tmp_path / "b.fsd"), f"--workdir={work}"]) == 2
    assert "is not a folder on this machine" in capsys.readouterr().err
    for out in ("b.fsd", "c.fsd"):  # again from the same process: memoised fingerprint
        assert codec.main(["compress", str(face), str(tmp_path / out), f"--workdir={work}",
                           f"--sd_checkpoint={moved}"]) == 0
        assert (tmp_path / out).read_bytes() == (tmp_path / "a.fsd").read_bytes()
    assert codec.main(["decompress", str(tmp_path / "b.fsd"), str(tmp_path / "b.png"),
                       f"--workdir={work}", f"--sd_checkpoint={moved}"]) == 0
    assert Image.open(tmp_path / "b.png").size == (50, 61)
    with cfg.unlocked():
        cfg.model.sd_checkpoint = str(moved)
        cfg.train.steps = 2
    assert train.train_and_evaluate(cfg, str(work))["step"] == 2  # resumed from step 1

    other = _converted_sd(tmp_path / "other", seed=4)
    assert codec.main(["compress", str(face), str(tmp_path / "d.fsd"), f"--workdir={work}",
                       f"--sd_checkpoint={other}"]) == 2
    assert "other frozen SD weights" in capsys.readouterr().err
    assert not (tmp_path / "d.fsd").exists()


def test_fingerprints_name_sd_weights_by_content_and_old_ones_by_path(tmp_path):
    cfg = tiny.get_config()
    cfg.model.sd_checkpoint = str(_converted_sd(tmp_path / "a"))
    new = train._frozen_fingerprint(cfg)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    same = cfg.copy_and_resolve_references()
    same.model.sd_checkpoint = str(tmp_path / "b")
    assert train._frozen_fingerprint(same) == new and new.startswith("sd-")
    (tmp_path / "b" / "vae" / "config.json").write_text(
        (tmp_path / "a" / "vae" / "config.json").read_text() + " ")  # any byte counts
    assert train._frozen_fingerprint(same) != new  # (size and mtime changed: hashed again)
    def old_rule(src: dict) -> str:  # the fingerprint checkpoints were saved with until now
        return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # checkpoints written before content fingerprints named the folder by its path
    legacy = old_rule({"sd_checkpoint": str(tmp_path / "a")})
    assert train._fingerprint_fits(legacy, cfg) and train._fingerprint_fits(new, cfg)
    assert not train._fingerprint_fits(legacy, same)
    # a folder that lost a file, or no folder: a ConversionError naming it
    (tmp_path / "b" / "vae" / "params.safetensors").unlink()
    with pytest.raises(convert.ConversionError, match="vae/params.safetensors is missing"):
        train._frozen_fingerprint(same)
    same.model.sd_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(convert.ConversionError, match="is not a folder"):
        train._frozen_fingerprint(same)
    # random frozen weights (no sd_checkpoint): named by seed and SD config, as before
    plain = tiny.get_config()
    weights_only = old_rule({"sd_checkpoint": "", "seed": plain.seed,
                             "unet": plain.model.unet.to_dict(), "vae": plain.model.vae.to_dict()})
    assert train._frozen_fingerprint(plain).startswith(weights_only + "+schedule-")
    assert train._fingerprint_fits(weights_only, plain)  # saved before the schedule was named


def test_fingerprints_name_the_noise_schedule(tmp_path):
    """A resume (or codec run) whose UNet would denoise for another noise schedule than the
    one it was trained with is refused: a hand-edited scheduler_config.json or
    model.scheduler changes the fingerprint; the same schedule spelled otherwise does not;
    checkpoints saved before the schedule was named are accepted by their weights."""
    ckpt = _converted_sd(tmp_path / "sd")
    (ckpt / "scheduler").mkdir()
    sched = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    (ckpt / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    cfg = tiny.get_config()
    cfg.model.sd_checkpoint, cfg.model.scheduler = str(ckpt), {}
    first = train._frozen_fingerprint(cfg)
    weights = first.split("+")[0]
    assert weights.startswith("sd-") and train._fingerprint_fits(first, cfg)
    assert not train._fingerprint_fits(5, cfg) and not train._fingerprint_fits(None, cfg)

    (ckpt / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**sched, "num_train_timesteps": 1000, "clip_sample": False, "_diffusers_version": "x",
         "clip_sample_range": 1, "beta_end": 0.012}))
    assert train._frozen_fingerprint(cfg) == first  # defaults spelled out, 1 for 1.0, unknown keys
    assert fasdiff.schedule_arguments({"num_train_timesteps": 1000, "x": 1}) == {}  # (and a
    # parameter added to Schedule.create later, at its default, changes no fingerprint)
    (ckpt / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**sched, "prediction_type": "v_prediction"}))
    edited = train._frozen_fingerprint(cfg)
    assert edited != first and edited.split("+")[0] == weights
    assert not train._fingerprint_fits(first, cfg)
    assert train._fingerprint_fits(weights, cfg)  # an old checkpoint: its weights alone
    with cfg.unlocked():
        cfg.model.scheduler = {"prediction_type": "epsilon"}  # the config's own wins
    assert train._frozen_fingerprint(cfg) == first
    meta = {"frozen": edited}
    with pytest.raises(train.TrainConfigError, match="noise schedule"):
        train._check_frozen(meta, cfg, str(tmp_path / "w"), 3)


def test_sd_fingerprints_are_memoised_across_commands_until_a_file_changes(tmp_path,
                                                                          monkeypatch):
    """A later command reads the folder's fingerprint from ``sd_fingerprints.json`` instead
    of hashing every byte again; rewriting a file (even with the same bytes, size and
    modification time) invalidates it; a damaged or unwritable memo only costs a re-hash."""
    ckpt = _converted_sd(tmp_path / "sd")
    monkeypatch.setenv("FASDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(convert, "_SD_FINGERPRINTS", {})  # a fresh process
    want = convert.sd_fingerprint(str(ckpt))
    memo_file = tmp_path / "cache" / convert.SD_FINGERPRINT_MEMO
    memo = json.loads(memo_file.read_text())
    assert list(memo.values()) == [want]
    memo_file.write_text(json.dumps({k: "f" * 64 for k in memo}))  # marks a memo hit
    monkeypatch.setattr(convert, "_SD_FINGERPRINTS", {})
    assert convert.sd_fingerprint(str(ckpt)) == "f" * 64  # read, not hashed
    time.sleep(0.05)  # past the file system's clock tick for change times
    weights = ckpt / "vae" / "params.safetensors"
    st = weights.stat()
    weights.write_bytes(weights.read_bytes())  # same bytes, in place (same inode and size)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    monkeypatch.setattr(convert, "_SD_FINGERPRINTS", {})
    assert convert.sd_fingerprint(str(ckpt)) == want  # hashed again: the change time moved
    memo_file.write_text("{not json")
    monkeypatch.setattr(convert, "_SD_FINGERPRINTS", {})
    assert convert.sd_fingerprint(str(ckpt)) == want
    assert list(json.loads(memo_file.read_text()).values()) == [want]  # rewritten whole
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FASDIFF_CACHE", str(tmp_path / "file"))  # cannot hold a memo
    monkeypatch.setattr(convert, "_SD_FINGERPRINTS", {})
    assert convert.sd_fingerprint(str(ckpt)) == want


def test_model_paths_are_made_absolute_once(tmp_path, monkeypatch):
    """A relative ``model.sd_checkpoint`` is resolved where the run starts, so the saved
    config (and the frozen-weights fingerprint) name the same folder from anywhere."""
    monkeypatch.chdir(tmp_path)
    cfg = tiny.get_config()
    assert train.with_absolute_paths(cfg) is cfg  # nothing relative: no copy
    cfg.model.sd_checkpoint = "ckpt/sd21"
    cfg.lock()
    out = train.with_absolute_paths(cfg)
    assert out.model.sd_checkpoint == str(tmp_path / "ckpt" / "sd21")
    assert cfg.model.sd_checkpoint == "ckpt/sd21" and out.is_locked
    cfg2 = tiny.get_config()
    cfg2.model.sd_checkpoint = "gs://bucket/sd21"
    assert train.with_absolute_paths(cfg2).model.sd_checkpoint == "gs://bucket/sd21"
    train.save_run_config(out, str(tmp_path))
    assert train.load_run_config(str(tmp_path)).model.sd_checkpoint == str(tmp_path / "ckpt" / "sd21")


@pytest.mark.xdist_group("train_scenario")
def test_codec_command_does_folders_in_one_run(scenario, tmp_path, capsys):  # noqa: F811
    """``--out_dir``: folders (recursive) and files in one model load; a bad input is reported
    and skipped, the rest written; ``--skip_existing`` leaves finished outputs alone."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec

    src = tmp_path / "faces"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()[20:81, 150:200]).save(src / "a.png")  # 61x50, as above
    Image.fromarray(skdata.chelsea()[40:101, 120:170]).save(src / "sub" / "b.jpg")
    (src / "broken.png").write_bytes(b"not an image")
    common = [f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={scenario['a']}", "--steps=2"]
    fsd, png = tmp_path / "fsd", tmp_path / "png"
    assert codec.main(["compress", str(src), f"--out_dir={fsd}"] + common) == 2
    out, err = capsys.readouterr()
    assert "compressed 2 of 3 files, 1 failed" in out and "broken.png" in err
    assert sorted(p.relative_to(fsd).as_posix() for p in fsd.rglob("*") if p.is_file()) == [
        "a.fsd", "sub/b.fsd"]  # nothing for the broken image, no temporary files left
    (png / "sub").mkdir(parents=True)
    (png / "sub" / "b.png").write_bytes(b"finished earlier")
    assert codec.main(["decompress", str(fsd), f"--out_dir={png}", "--skip_existing"] + common) == 0
    assert "decompressed" not in capsys.readouterr().out  # one job: no summary line
    assert Image.open(png / "a.png").size == (50, 61)
    assert (png / "sub" / "b.png").read_bytes() == b"finished earlier"
    assert codec.main(["decompress", str(fsd), f"--out_dir={png}", "--skip_existing"] + common) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert codec.main(["compress", str(src), f"--out_dir={tmp_path / 'x'}", "--eta=2"] + common) == 2
    assert capsys.readouterr().err.count("eta must be in [0, 1]") == 1  # once, before any file


@pytest.mark.xdist_group("train_scenario")
def test_decompress_runs_files_of_one_size_and_sampler_together(scenario, tmp_path, capsys):  # noqa: F811
    """``decompress --batch_size``: files of one latent size and sampler spec go through the
    sampler together, each with its own seed's noise, so every file decodes as it does alone
    (within one grey level: float rounding of batched convolutions); a file of another size
    or sampler spec runs in its own group, and a damaged one is reported in its place while
    the others are written."""
    from PIL import Image
    from skimage import data as skdata

    from fasdiff_jax import codec

    cfg, work = _config(scenario["source"]), str(scenario["a"])
    model, params, _, _ = train.restore_for_inference(cfg, work)
    photo = skdata.astronaut()
    files = {f"s{i}": model.compress(params, photo[20 + 9 * i:81 + 9 * i, 150:200], steps=2,
                                     seed=i) for i in range(5)}  # 61x50, five seeds
    files["other_size"] = model.compress(params, photo[:40, :70], steps=2, seed=1)
    files["other_steps"] = model.compress(params, photo[20:81, 150:200], steps=3, seed=1)
    files["damaged"] = files["s0"][:-3]
    names = list(files)
    alone = {}
    for n in names:
        try:
            alone[n] = model.decompress(params, files[n])
        except Exception as e:  # noqa: BLE001 - compared below
            alone[n] = e
    together = dict(zip(names, model.decompress_batch(params, [files[n] for n in names])))
    for n in names:
        if n == "damaged":
            assert type(together[n]) is type(alone[n]) and "checksum" in str(together[n])
            continue
        assert together[n].shape == alone[n].shape
        assert np.abs(together[n].astype(int) - alone[n]).max() <= 1, n
    assert np.abs(together["s0"].astype(int) - together["s1"]).mean() > 1  # their own noise

    fsd = tmp_path / "fsd"
    fsd.mkdir()
    for n in names:
        (fsd / f"{n}.fsd").write_bytes(files[n])
    common = [f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={work}"]
    decoded = {}
    for size in (1, 4):
        out = tmp_path / f"png{size}"
        assert codec.main(["decompress", str(fsd), f"--out_dir={out}", f"--batch_size={size}"]
                          + common) == 2
        stdout, err = capsys.readouterr()
        assert "decompressed 7 of 8 files, 1 failed" in stdout and "damaged.fsd" in err
        decoded[size] = {n: np.asarray(Image.open(out / f"{n}.png")) for n in names
                         if n != "damaged"}
        assert not (out / "damaged.png").exists()
    for n, img in decoded[4].items():
        assert np.abs(img.astype(int) - decoded[1][n]).max() <= 1, n
    with pytest.raises(SystemExit):
        codec.main(["decompress", str(fsd), f"--out_dir={tmp_path / 'x'}", "--batch_size=0"]
                   + common)


# ------------------------------------------------------------------ several processes
def _logged(stderr: str) -> dict[int, str]:
    """step -> the ``train/...`` scalars line CLU logged (every process logs them)."""
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"\] \[(\d+)\] (train/bpp=[^\n]*)", stderr)}


@pytest.mark.run_early
def test_two_processes_train_and_one_process_resumes(embedded_dirs, tmp_path):  # noqa: F811
    """``main --jax_distributed``: 2 processes x 4 CPU devices (gloo), one mesh of 8, a
    held-out evaluation and a checkpoint with its metrics every step, the best kept besides
    the latest. After step 2 one process gets SIGTERM (a host's preemption notice): both reach
    JAX's preemption sync point at the same step, stop there together and exit with 143. Then
    this process (1 x 8 devices) loads the best and the last checkpoint and resumes the last."""
    src = f"prepared:{embedded_dirs['train']}"
    work = tmp_path / "w"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "fasdiff_jax.main", "--jax_distributed",
            f"--config={ROOT / 'configs' / 'tiny.py'}", f"--workdir={work}", "--config.train.steps=8",
            f"--compile_cache={tmp_path / 'xla'}"]
    held = {**_eval_overrides(embedded_dirs["heldout"]), "eval.every_steps": 1,
            "eval.x0_terms": False, "eval.images": 0,  # each process evaluates half a batch
            "eval.best_metric": "loss", "eval.best_mode": "max"}  # max: not the latest
    argv += [f"--config.{k}={v}" for k, v in {**_overrides(src), "train.checkpoint_every": 100,
                                              "train.max_to_keep": 1, **held}.items()]
    def start(port: int) -> list[subprocess.Popen]:
        return [subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID=str(i), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     XLA_FLAGS="--xla_force_host_platform_device_count=4")) for i in range(2)]

    # The workdir in use: both processes stop with the error (process 1 waited in its first
    # collective until the coordinator gave up: only process 0 takes the lock).
    with train.workdir_lock(str(work)):
        refused = start(port)
        try:
            errs = [p.communicate(timeout=300)[1] for p in refused]
        finally:
            for p in refused:
                p.kill()
    assert [p.returncode for p in refused] == [2, 2], errs
    assert f"WorkdirInUseError: {work}: another training run is using this workdir (pid " \
           f"{os.getpid()} on" in errs[0]
    assert "WorkdirInUseError" in errs[1] and not (work / "checkpoints").exists()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = start(port)
    logs = [[], []]
    readers = [threading.Thread(target=lambda i=i: logs[i].extend(procs[i].stderr), daemon=True)
               for i in range(2)]
    try:
        for r in readers:
            r.start()
        deadline = time.monotonic() + 900
        while not any("] [2] train/bpp" in line for line in list(logs[0])):
            assert time.monotonic() < deadline and procs[0].poll() is None, "".join(logs[0])[-4000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=600)
        for r in readers:
            r.join(timeout=60)
    finally:
        for p in procs:
            p.kill()
    logs = ["".join(lines) for lines in logs]
    for i, err in enumerate(logs):
        assert procs[i].returncode == 128 + signal.SIGTERM, err[-4000:]  # stopped, not done
        assert f"process {i}/2, 4 local / 8 global devices" in err
        assert f"compilation cache: {tmp_path / 'xla'}" in err
    assert list((tmp_path / "xla").glob("*-cache"))  # written by process 0 (JAX's rule)
    kept = _steps(work)
    stop = kept[-1]
    assert 2 <= stop < 8, kept  # where the notice stopped it
    for err in logs:
        assert f"preemption notice: saving step {stop} and stopping" in err
    # the metrics are global arrays: both processes log the same values, every step
    assert sorted(_logged(logs[0])) == list(range(1, stop + 1))
    assert _logged(logs[0]) == _logged(logs[1])
    held_out = [{int(k): ast.literal_eval(v) for k, v in
                 re.findall(r"step (\d+) held-out: (\{[^\n]*\})", "".join(log))} for log in logs]
    assert sorted(held_out[0]) == list(range(1, stop + 1))
    assert held_out[0] == held_out[1]  # one global result, whichever process logs it
    # the best (highest held-out loss, the earliest of equals) is kept besides the latest,
    # both processes name the same steps as new bests, and its metrics were saved with it
    losses = {s: m["loss"] for s, m in held_out[0].items()}
    best = max(losses, key=lambda s: (losses[s], -s))
    assert kept == sorted({best, stop}), (kept, losses)
    news = [re.findall(r"step (\d+): best held-out loss so far", err) for err in logs]
    assert news[0] == news[1] and int(news[0][-1]) == best, news
    saved_metrics = json.loads((work / "checkpoints" / str(best) / "metrics" / "metrics")
                               .read_text())
    assert saved_metrics["loss"] == pytest.approx(losses[best], rel=1e-5)
    s = _scalars(work)  # summaries: process 0 only
    assert all(np.isfinite(s[f"train/{t}"][stop]) for t in TERMS)
    d = work / "checkpoints" / str(stop) / "data"
    for i in range(2):  # each process's position in its own shard of the data
        assert json.loads((d / f"process_{i}-of-2.json").read_text())["next_index"] == stop

    assert int(_saved_state(work, stop)["opt_state"]["count"]) == stop

    # the codec / evaluate commands load it on one machine (the saved shardings name 8
    # devices of two processes): trained leaves moved away from the seeded init, frozen did not
    cfg = _config(src)
    assert train.load_run_config(str(work)).mesh.data == 8  # written once, by process 0
    model, params, step, weights = train.restore_for_inference(cfg, str(work))
    assert weights == "ema"  # the run's train.ema_decay: the params' moving average
    init = model.init_params(jax.random.key(cfg.seed))
    trained = dict(jax.tree_util.tree_flatten_with_path(fasdiff.FaSDiff.split(params)[0])[0])
    start = dict(jax.tree_util.tree_flatten_with_path(fasdiff.FaSDiff.split(init)[0])[0])
    assert step == stop and trained.keys() == start.keys()
    run_cfg = train.load_run_config(str(work))  # its eval.best_mode: max
    assert train.restore_for_inference(run_cfg, str(work), step="best")[2] == best
    assert all(np.isfinite(np.asarray(v)).all() for v in trained.values())
    assert sum(not np.array_equal(trained[k], start[k]) for k in trained) > len(trained) // 2
    saved = _saved_params(work, stop, ema=True)
    for k, v in trained.items():
        np.testing.assert_array_equal(np.asarray(v), saved[_path(k)])

    # training in one process cannot take over two processes' data positions: refused, named;
    # with restart_data it restores params and optimizer state onto its own mesh instead
    with pytest.raises(train.TrainConfigError, match="written by 2 processes, this run has 1"):
        train.train_and_evaluate(_config(src, **{"train.steps": stop + 1}), str(work))
    out = train.train_and_evaluate(
        _config(src, **{"train.steps": stop, "train.on_process_count_change": "restart_data"}),
        str(work))
    assert out == {"step": stop} and _steps(work) == kept


def test_an_empty_workdir_is_refused_and_a_tilde_expanded(monkeypatch, tmp_path):
    """``--workdir=`` trained into the current folder; the shell leaves ``~`` in
    ``--workdir=~/runs/x``, which made a folder named ``~``."""
    for empty in ("", "  "):
        with pytest.raises(train.TrainConfigError, match="--workdir is empty"):
            train.train_and_evaluate(tiny.get_config(), empty)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert train._workdir("~/runs/x") == str(tmp_path / "runs" / "x")
    assert train._workdir("gs://bucket/~run") == "gs://bucket/~run"


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path):
    """Two runs on one workdir saved over each other's checkpoints: the second is refused,
    naming the holder; a lock left by a killed run does not block (flock dies with it)."""
    work = tmp_path / "w"
    with train.workdir_lock(str(work)):
        assert f"pid {os.getpid()} on" in (work / train.LOCK_FILE).read_text()
        with pytest.raises(errors.WorkdirInUseError,
                           match=re.escape(f"{work}: another training run is using this "
                                           f"workdir (pid {os.getpid()} on")):
            train.train_and_evaluate(tiny.get_config(), str(work))
    assert not work.exists()  # the workdir it made held only its lock: both removed

    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.truncate(0); f.write('pid 1 on elsewhere'); f.flush(); print('held', flush=True)\n"
         "time.sleep(60)\n", str(work / train.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(errors.WorkdirInUseError, match=r"\(pid 1 on elsewhere, lock "):
            with train.workdir_lock(str(work)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with train.workdir_lock(str(work)):  # the killed holder's lock went with it
        assert f"pid {os.getpid()} on" in (work / train.LOCK_FILE).read_text()
    with train.workdir_lock("gs://bucket/run"):  # URLs are not locked (nor touched)
        pass


def test_a_lock_file_removed_by_its_last_holder_is_not_locked(tmp_path, monkeypatch):
    """A run refused before writing anything removes the lock-only workdir it made while it
    holds the lock; a second run that opened the file just before took the lock of a file
    no path names, and a third run locked a new file beside it: two runs on one workdir.
    The lock is taken again until it is on the file the path names."""
    import fcntl

    work = tmp_path / "w"
    work.mkdir()
    (work / train.LOCK_FILE).write_text("pid 1 on elsewhere")  # the refused run's lock
    real, calls = fcntl.flock, []

    def flock(f, op):
        if not calls:  # its holder removes it between our open and our lock
            os.remove(work / train.LOCK_FILE)
            os.rmdir(work)
        calls.append(op)
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with train.workdir_lock(str(work)):
        assert len([c for c in calls if c & fcntl.LOCK_EX]) == 2
        monkeypatch.setattr(fcntl, "flock", real)
        with pytest.raises(errors.WorkdirInUseError):  # the third run
            with train.workdir_lock(str(work)):
                pass
    assert not work.exists()  # the workdir it made held only its lock: both removed


def test_orbax_logs_of_a_failed_write_and_its_info_lines_are_kept_out_of_the_run_log():
    """A full disk during a save printed 3,449 lines: Orbax's ERROR record of the failure
    from each thread, with tracebacks, and TensorStore's late callbacks; each checkpoint
    also logged ~45 INFO lines. Orbax's write-failure records are dropped (the run reports
    the error in one line), its other errors and warnings stay; its INFO lines stay out of
    the training command's log unless --verbosity=1."""
    from absl import logging as absl_logging

    from fasdiff_jax import main

    def record(level, path, exc=None):
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("absl", level, path, 1, "m", None, info)

    orbax = os.path.join(train.ORBAX_DIR, "checkpoint", "x.py")
    assert os.path.isfile(os.path.join(train.ORBAX_DIR, "checkpoint", "__init__.py"))
    ours = os.path.join(os.sep, "home", "u", "orbax", "fasdiff-jax", "fasdiff_jax", "train.py")
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "a" in OCDBT: No space left on device')
    train._drop_late_orbax_callbacks()
    absl = logging.getLogger("absl")
    assert not absl.filter(record(logging.ERROR, orbax, full))
    assert absl.filter(record(logging.ERROR, orbax, ValueError("a bug")))
    assert absl.filter(record(logging.ERROR, ours, full))
    assert absl.filter(record(logging.WARNING, orbax))

    handler = absl_logging.get_absl_handler()
    before = list(handler.filters)  # an in-process main() run may have added it already
    try:
        handler.filters[:] = []
        main.quiet_orbax_info()
        main.quiet_orbax_info()  # once only
        assert len(handler.filters) == 1
        assert not handler.filter(record(logging.INFO, orbax))
        assert handler.filter(record(logging.WARNING, orbax))
        assert handler.filter(record(logging.INFO, ours))  # "orbax" in a checkout's path
        handler.filters[:] = []
        with mock.patch.object(absl_logging, "get_verbosity", return_value=1):
            main.quiet_orbax_info()
        assert handler.filter(record(logging.INFO, orbax))
    finally:
        handler.filters[:] = before


def test_failed_writes_are_one_named_error_and_leave_no_temporary_file(tmp_path, capsys):
    """A full disk during a checkpoint save (Orbax's ValueError), the lock or the run config
    (OSError) ended training with a traceback; config.json.tmp was left behind."""
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.0.mu" in OCDBT database '
                      'at local file "/w/d/x": No space left on device\n  (async trace...)')
    for raised, cause in ((full, "No space left on device"),  # not TensorStore's temp file
                          (OSError(28, "No space left on device"), "No space left on device")):
        with pytest.raises(errors.WriteError, match=re.escape(f"W: checkpoint 4: cannot write "
                                                              f"({cause}); what was complete")):
            with train.writing("W: checkpoint 4"):
                raise raised
    for other in (ValueError("a bug, not a write"), errors.DataError("d")):  # unchanged
        with pytest.raises(type(other), match=str(other)), train.writing("W"):
            raise other

    work = tmp_path / "w"
    (work / train.RUN_CONFIG).mkdir(parents=True)  # config.json a folder: the write fails
    with pytest.raises(errors.WriteError, match=re.escape(
            f"{work / train.RUN_CONFIG}: cannot write (")):
        train.save_run_config(tiny.get_config(), str(work))
    assert sorted(p.name for p in work.iterdir()) == [train.RUN_CONFIG]  # no .tmp left

    full = OSError(28, "No space left on device")
    assert _main_exit_code("tiny.py", work, raises=full) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: OSError: [Errno 28] No space left on device"]
