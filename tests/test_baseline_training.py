"""The mbt2018-mean baseline trained by the FaSDiff train loop (``configs/mbt2018_mean.py``):
data-parallel steps on an 8-device mesh, a falling loss, an exact resume, and the codec and
evaluate commands coding with the trained checkpoint from its workdir alone."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from skimage import data as skdata

from configs import mbt2018_mean
from data_fixtures import embedded_dirs  # noqa: F401 (fixture)
from fasdiff_jax import codec, evaluate, train
from fasdiff_jax.data.sources import open_source
from fasdiff_jax.models import hyperprior as H

STEPS = 30


def small_config(source: str, **train_fields) -> "ml_collections.ConfigDict":  # noqa: F821
    """configs/mbt2018_mean.py at N=8, M=12, 64 px, one batch of 8 over 8 devices."""
    cfg = mbt2018_mean.get_config()
    cfg.model.update(N=8, M=12, image_size=64)
    cfg.data.update(source=source, image_size=64, global_batch_size=8)
    cfg.mesh.data = 8
    cfg.train.update(**{"steps": STEPS, "learning_rate": 1e-3, "log_every": 1,
                        "checkpoint_every": STEPS // 2, **train_fields})
    return cfg


@pytest.fixture(scope="module")
def trained(embedded_dirs, tmp_path_factory):  # noqa: F811
    source = f"prepared:{embedded_dirs['train']}"
    root = tmp_path_factory.mktemp("mbt")
    a, b = root / "a", root / "b"
    first = train.train_and_evaluate(small_config(source, steps=1), str(root / "one"))
    held_out = small_config(source)
    held_out.eval.update(source=f"prepared:{embedded_dirs['heldout']}", every_steps=STEPS // 2,
                         batch_size=8)
    out = train.train_and_evaluate(held_out, str(a))
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / str(STEPS // 2), b / "checkpoints" / str(STEPS // 2))
    resumed = train.train_and_evaluate(held_out, str(b))
    return dict(a=a, first=first, out=out, resumed=resumed, source=source, held_out=held_out)


@pytest.mark.xdist_group("baseline_training")
def test_the_loop_trains_and_resumes_the_baseline(trained):
    first, out, resumed = trained["first"], trained["out"], trained["resumed"]
    assert set(out) >= {"loss", "bpp", "mse", "grad_norm", "learning_rate", "step"}
    assert out["step"] == STEPS and resumed["step"] == STEPS
    assert out["loss"] < 0.7 * first["loss"], (first, out)  # rate + lmbda·255²·MSE falls
    for k in ("loss", "bpp", "mse"):  # resumed at STEPS/2: the same last step
        assert resumed[k] == pytest.approx(out[k], rel=1e-5), k
        assert resumed[f"eval/{k}"] == pytest.approx(out[f"eval/{k}"], rel=1e-5), k
    assert out["eval/psnr"] == pytest.approx(10 * np.log10(1 / out["eval/mse"]))
    saved = train.load_run_config(str(trained["a"]))
    assert saved.model.kind == "hyperprior" and saved.model.N == 8


@pytest.mark.xdist_group("baseline_training")
def test_the_loop_trains_with_microbatches(trained, tmp_path, monkeypatch):
    """``train.microbatches``: the loop builds its steps with it (16 images over 8 devices in
    2 parts) and trains; a batch that does not split is refused before the first step."""
    from fasdiff_jax.models import train_step

    built = []
    real = train_step.make_train_step
    monkeypatch.setattr(train_step, "make_train_step",
                        lambda *a, **k: built.append(k.get("microbatches")) or real(*a, **k))
    cfg = small_config(trained["source"], steps=2, microbatches=2)
    cfg.data.global_batch_size = 16
    out = train.train_and_evaluate(cfg, str(tmp_path / "w"))
    assert built == [2, 2] and out["step"] == 2  # the plain and the x̂0 step
    assert np.isfinite(out["loss"]) and out["grad_norm"] > 0
    cfg.train.microbatches = 4
    with pytest.raises(train.TrainConfigError, match="2 per shard, which does not split into 4"):
        train.train_and_evaluate(cfg, str(tmp_path / "x"))


@pytest.mark.xdist_group("baseline_training")
def test_keep_period_keeps_milestone_checkpoints_and_steps_are_profiled(trained, tmp_path):
    """``train.keep_period`` keeps every checkpoint whose step is a multiple of it besides the
    ``max_to_keep`` latest; the codec and evaluate commands take any of them with --step.
    ``train.profile_steps`` writes a jax.profiler trace of those steps for TensorBoard."""
    work = tmp_path / "w"
    train.train_and_evaluate(small_config(trained["source"], steps=5, checkpoint_every=1,
                                          max_to_keep=1, keep_period=2, profile_first_step=3,
                                          profile_steps=2), str(work))
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [2, 4, 5]
    traces = list(work.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and b"train" in traces[0].read_bytes()  # the steps' annotation
    cfg = train.load_run_config(str(work))
    assert train.restore_for_inference(cfg, str(work), 2)[2] == 2
    with pytest.raises(train.TrainConfigError, match=r"no checkpoint of step 3; it has \[2, 4, 5\]"):
        train.restore_for_inference(cfg, str(work), 3)


@pytest.mark.xdist_group("baseline_training")
def test_the_best_held_out_checkpoint_is_kept_and_coded_with(trained, embedded_dirs, tmp_path,  # noqa: F811
                                                             capsys):
    """``eval.best_metric``: every evaluation saves a checkpoint with its metrics; the one with
    the best value stays beside the ``max_to_keep`` latest, across a resume, and
    ``--step=best`` codes with it. (``best_mode="max"`` on the falling loss, so the best is
    an early one that max_to_keep=1 alone would delete.)"""
    from test_train import _scalars

    work = tmp_path / "w"
    cfg = small_config(trained["source"], steps=6, checkpoint_every=3, max_to_keep=1)
    cfg.eval.update(source=f"prepared:{embedded_dirs['heldout']}", every_steps=2, batch_size=8,
                    images=0, best_metric="loss", best_mode="max")
    train.train_and_evaluate(cfg, str(work))
    losses = _scalars(work)["eval/loss"]
    assert sorted(losses) == [0, 2, 4, 6]  # eval.at_start (configs/mbt2018_mean.py): step 0 too
    assert losses[0] == max(losses.values())  # the init's: the highest, yet no candidate
    at_start = losses.pop(0)
    best = max(losses, key=losses.get)
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == sorted({best, 6})
    saved = json.loads((work / "checkpoints" / str(best) / "metrics" / "metrics").read_text())
    assert saved["loss"] == pytest.approx(losses[best], rel=1e-6)  # what the policy ranks by

    run_cfg = train.load_run_config(str(work))
    assert train.restore_for_inference(run_cfg, str(work), "best")[2] == best
    cfg.train.steps = 8  # resumed: step 8's evaluation joins the ranking, step 6 goes
    train.train_and_evaluate(cfg, str(work))
    losses = _scalars(work)["eval/loss"]
    assert sorted(losses) == [0, 2, 4, 6, 8]
    assert losses.pop(0) == at_start  # a resumed run does not log step 0 again
    best = max(losses, key=losses.get)
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == sorted({best, 8})

    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:84, 150:214]).save(face)
    for step in ("best", str(best)):
        assert codec.main(["compress", str(face), str(tmp_path / f"{step}.fsd"),
                           f"--workdir={work}", f"--step={step}"]) == 0
    assert (tmp_path / "best.fsd").read_bytes() == (tmp_path / f"{best}.fsd").read_bytes()
    res = tmp_path / "best.json"
    assert evaluate.main([f"--workdir={work}", "--step=best", f"--out={res}", "--limit=1",
                          f"--source=prepared:{embedded_dirs['heldout']}"]) == 0
    assert json.loads(res.read_text())["settings"]["checkpoint_step"] == best

    # a run without held-out metrics has no best; a metric the evaluation does not log is
    # refused before the first step; so is a mode other than min and max
    capsys.readouterr()
    assert codec.main(["compress", str(face), str(tmp_path / "x.fsd"),
                       f"--workdir={trained['a'].parent / 'one'}", "--step=best"]) == 2
    assert "no checkpoint has held-out metrics with 'loss'" in capsys.readouterr().err
    cfg.eval.best_metric = "lpips"
    with pytest.raises(train.TrainConfigError,
                       match=r"best_metric='lpips' is not among the held-out metrics \['bpp', "
                             r"'loss', 'mse', 'psnr'\]"):
        train.train_and_evaluate(cfg, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()  # it held the run's train.lock
    (tmp_path / "mine").mkdir()  # a folder the user made stays; only the lock goes
    with pytest.raises(train.TrainConfigError, match="best_metric='lpips'"):
        train.train_and_evaluate(cfg, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == []
    cfg.eval.update(best_metric="psnr", best_mode="highest")
    with pytest.raises(train.TrainConfigError, match="best_mode must be 'min' or 'max'"):
        train.train_and_evaluate(cfg, str(tmp_path / "other"))
    with pytest.raises(SystemExit):
        codec.main(["compress", str(face), str(tmp_path / "x.fsd"), f"--workdir={work}",
                    "--step=good"])
    assert "expected a step number or 'best', got 'good'" in capsys.readouterr().err


@pytest.mark.xdist_group("baseline_training")
def test_a_moving_average_of_the_params_is_trained_evaluated_and_coded_with(
        trained, embedded_dirs, tmp_path, capsys):  # noqa: F811
    """``train.ema_decay``: the run keeps the params' moving average in its checkpoints, a
    resumed run reproduces it, the held-out metrics are the average's, and the codec and
    evaluate commands (and ``codec export``) code with it by default or with the last params
    on request. Resuming without it is refused (it would be lost); switching it on when
    resuming a run without one starts it from the restored params."""
    from fasdiff_jax.data.pipeline import make_dataset
    from fasdiff_jax.sharding import create_mesh

    work, again = tmp_path / "w", tmp_path / "again"
    cfg = small_config(trained["source"], steps=4, checkpoint_every=2, ema_decay=0.5)
    cfg.eval.update(source=f"prepared:{embedded_dirs['heldout']}", every_steps=2, batch_size=8,
                    images=0, last_params_too=True)
    out = train.train_and_evaluate(cfg, str(work))
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(work / "checkpoints" / "2", again / "checkpoints" / "2")
    train.train_and_evaluate(cfg, str(again))

    run_cfg = train.load_run_config(str(work))
    ema = train.restore_for_inference(run_cfg, str(work))
    last = train.restore_for_inference(run_cfg, str(work), weights="params")
    assert (ema.step, ema.weights, last.weights) == (4, "ema", "params")
    resumed = train.restore_for_inference(run_cfg, str(again), weights="ema")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 resumed.params, ema.params)
    assert max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(ema.params), jax.tree.leaves(last.params))) > 1e-4  # it lags
    # the partial read is the average in the whole saved state
    state_dir = work / "checkpoints" / "4" / "state"
    whole = ocp.StandardCheckpointer().restore(state_dir, train.one_device_target(state_dir))
    jax.tree.map(np.testing.assert_array_equal, whole["opt_state"]["ema_params"],
                 {k: ema.params[k] for k in whole["params"]})
    # held-out metrics at step 4: the average's, not the last params' (eval.last_params_too:
    # those as eval_params/*)
    held = train.held_out_settings(cfg, create_mesh({"data": 8}), 4)
    images = next(iter(make_dataset(held.data, held.source, 0, 1)))["image"]
    eval_step = ema.model.make_eval_step()
    key = jax.random.key(held.seed)
    got = {w.weights: float(eval_step(w.params, {"image": images}, jax.random.fold_in(key, 0))
                            ["loss"]) for w in (ema, last)}
    assert got["ema"] == pytest.approx(out["eval/loss"], rel=1e-4), (got, out["eval/loss"])
    assert got["params"] != pytest.approx(out["eval/loss"], rel=1e-3)
    assert got["params"] == pytest.approx(out["eval_params/loss"], rel=1e-4)
    assert set(out) >= {"eval_params/bpp", "eval_params/mse", "eval_params/psnr"}
    from test_train import _scalars

    logged = _scalars(work)
    assert sorted(logged["eval_params/loss"]) == sorted(logged["eval/loss"]) == [0, 2, 4]

    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:84, 150:214]).save(face)
    files = {}
    for flags in ([], ["--weights=ema"], ["--weights=params"]):
        name = "-".join(flags) or "default"
        assert codec.main(["compress", str(face), str(tmp_path / f"{name}.fsd"),
                           f"--workdir={work}", *flags]) == 0
        files[name] = (tmp_path / f"{name}.fsd").read_bytes()
    assert files["default"] == files["--weights=ema"] != files["--weights=params"]
    assert files["default"] == H.compress(ema.model.model, ema.params[ema.model.KEY],
                                          np.asarray(Image.open(face)))
    res = tmp_path / "ema.json"
    assert evaluate.main([f"--workdir={work}", f"--out={res}", "--limit=1",
                          f"--source=prepared:{embedded_dirs['heldout']}"]) == 0
    assert json.loads(res.read_text())["settings"]["weights"] == "ema"

    exported = tmp_path / "export"
    capsys.readouterr()
    assert codec.main(["export", f"--workdir={work}", "--weights=params", str(exported)]) == 0
    assert "its 'params' weights" in capsys.readouterr().out
    assert train.restore_for_inference(run_cfg, str(exported)).weights == "params"
    assert codec.main(["compress", str(face), str(tmp_path / "x.fsd"),
                       f"--workdir={exported}"]) == 0
    assert (tmp_path / "x.fsd").read_bytes() == files["--weights=params"]
    with pytest.raises(train.TrainConfigError, match="an export of the run's 'params' weights"):
        train.restore_for_inference(run_cfg, str(exported), weights="ema")

    plain = trained["a"].parent / "one"  # trained without an average
    assert codec.main(["compress", str(face), str(tmp_path / "y.fsd"), f"--workdir={plain}",
                       "--weights=ema"]) == 2
    assert "checkpoint 1 has no moving average of the params" in capsys.readouterr().err
    assert codec.main(["compress", str(face), str(tmp_path / "y.fsd"), "--model_dir=m",
                       "--weights=ema"]) == 2
    assert "not both" in capsys.readouterr().err
    cfg.train.update(steps=6, ema_decay=0.0)  # would drop the average: refused
    with pytest.raises(train.TrainConfigError, match="checkpoint 4 holds a moving average of "
                                                     "the params, which config.train.ema_decay=0"):
        train.train_and_evaluate(cfg, str(work))
    # switched on when resuming a run without one: the average starts from the restored params
    shutil.copytree(plain, tmp_path / "plain")
    train.train_and_evaluate(small_config(trained["source"], steps=2, ema_decay=0.9),
                             str(tmp_path / "plain"))
    plain_dir = str(tmp_path / "plain")
    cfg_plain = train.load_run_config(plain_dir)
    started = train.restore_for_inference(cfg_plain, plain_dir)
    assert (started.step, started.weights) == (2, "ema")
    jax.tree.map(np.testing.assert_array_equal, started.params,  # one update: the params
                 train.restore_for_inference(cfg_plain, plain_dir, weights="params").params)


@pytest.mark.xdist_group("baseline_training")
def test_a_learning_rate_multiplier_reaches_the_step_and_may_change_on_resume(trained, tmp_path):
    """``train.lr_multipliers``: at 0 the baseline's one component stays at its init through
    the loop's steps; resumed with another factor (the optimizer state is the same), it moves;
    a component the model does not have is refused before the first step."""
    work = tmp_path / "w"
    cfg = small_config(trained["source"], steps=2, lr_multipliers={"hyperprior": 0.0})
    train.train_and_evaluate(cfg, str(work))
    init = train.build_model(cfg.model).init_params(jax.random.key(cfg.seed))
    run_cfg = train.load_run_config(str(work))
    held = train.restore_for_inference(run_cfg, str(work)).params
    jax.tree.map(np.testing.assert_array_equal, held, init)
    cfg.train.update(steps=3, lr_multipliers={"hyperprior": 2.0})
    train.train_and_evaluate(cfg, str(work))
    moved = train.restore_for_inference(run_cfg, str(work))
    assert moved.step == 3 and not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(moved.params), jax.tree.leaves(init)))
    cfg.train.lr_multipliers = {"controlnet": 0.5}
    with pytest.raises(train.TrainConfigError, match=r"\['controlnet'\] are not trainable "
                                                     r"components of this model"):
        train.train_and_evaluate(cfg, str(tmp_path / "x"))
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.xdist_group("baseline_training")
def test_held_out_bpp_is_the_rate_of_the_coded_files(trained):
    """The loop's held-out bpp (rounded latents) is what the codec writes for those images:
    the same 8 images, coded with the last step's params, within 1% of it plus up to one
    32-bit word per file (the range coder's granularity; the payload here is ~80 bytes per
    image; 66-byte headers excluded, they are not part of the model's rate)."""
    from fasdiff_jax.data.pipeline import make_dataset
    from fasdiff_jax.sharding import create_mesh

    out, work = trained["out"], str(trained["a"])
    mesh = create_mesh({"data": 8})
    held = train.held_out_settings(trained["held_out"], mesh, STEPS)
    assert held.batches == 1  # 9 held-out images: one whole batch of 8
    images = next(iter(make_dataset(held.data, held.source, 0, 1)))["image"]
    model, params, step, _ = train.restore_for_inference(train.load_run_config(work), work)
    assert step == STEPS and images.shape == (8, 64, 64, 3)
    payload_bits = sum(8 * (len(H.compress(model.model, params[model.KEY], im)) - 66)
                       for im in images)
    model_bits = out["eval/bpp"] * images[..., 0].size
    assert abs(payload_bits - model_bits) <= 0.01 * model_bits + 32 * len(images), (
        payload_bits, model_bits)
    # the logged pictures: the first 4 of these images beside the model's reconstructions
    from test_train import _pictures

    pictures = _pictures(trained["a"])["eval/reconstructions"]
    assert sorted(pictures) == [0, STEPS // 2, STEPS]  # eval.at_start: the init's too
    assert pictures[STEPS].shape == (4, 64, 128, 3)
    np.testing.assert_array_equal(pictures[STEPS][:, :, :64], images[:4])
    recon = np.round(np.asarray(model.reconstruct(params, images[:4], None)) * 255)
    assert np.abs(pictures[STEPS][:, :, 64:] - recon).max() <= 1  # 8 devices there, 1 here


@pytest.mark.xdist_group("baseline_training")
def test_codec_and_evaluate_use_the_trained_baseline(trained, embedded_dirs, tmp_path, capsys):  # noqa: F811
    work = str(trained["a"])
    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[20:120, 150:230]).save(face)  # 100x80, padded to 128
    assert codec.main(["compress", str(face), str(tmp_path / "f.fsd"), f"--workdir={work}"]) == 0
    assert codec.main(["decompress", str(tmp_path / "f.fsd"), str(tmp_path / "o.png"),
                       f"--workdir={work}"]) == 0
    # the same bytes and pixels as the library with the checkpoint's params
    model, params, step, _ = train.restore_for_inference(train.load_run_config(work), work)
    assert step == STEPS and isinstance(model, H.TrainableHyperprior)
    img = np.asarray(Image.open(face))
    data = (tmp_path / "f.fsd").read_bytes()
    assert data == H.compress(model.model, params[model.KEY], img)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")),
                                  H.decompress(model.model, params[model.KEY], data))
    assert codec.main(["info", str(tmp_path / "f.fsd")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["codec"] == "mbt2018-mean"
    assert codec.main(["compress", str(face), str(tmp_path / "g.fsd"), f"--workdir={work}",
                       "--steps=3"]) == 2
    assert "sampler and SD settings apply to FaSDiff" in capsys.readouterr().err

    out = tmp_path / "mbt.json"
    assert evaluate.main([f"--workdir={work}", f"--source=prepared:{embedded_dirs['heldout']}",
                          "--limit=2", f"--out={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["name"] == f"mbt2018-mean@{STEPS}" and res["complete"] and len(res["images"]) == 2
    assert res["settings"]["checkpoint_step"] == STEPS and len(res["settings"]["fingerprint"]) == 32
    row = res["images"][0]
    assert row["bpp"] == pytest.approx(8 * row["bytes"] / (row["height"] * row["width"]))
    assert np.isfinite(row["psnr-rgb"]) and row["psnr-rgb"] > 10


@pytest.mark.xdist_group("baseline_training")
def test_the_trained_baseline_exports_to_a_model_dir(trained, tmp_path, capsys):
    """``convert --hyperprior_workdir``: the params of the latest checkpoint as a
    ``--model_dir`` folder that codes the same bytes as the workdir."""
    from fasdiff_jax import convert

    out = tmp_path / "mbt"
    assert convert.main(["--hyperprior_workdir", str(trained["a"]), "--out", str(out)]) == 0
    assert f"N=8 M=12 (step {STEPS}, params weights)" in capsys.readouterr().out
    face = tmp_path / "face.png"
    Image.fromarray(skdata.chelsea()[:90, :110]).save(face)
    assert codec.main(["compress", str(face), str(tmp_path / "w.fsd"), f"--workdir={trained['a']}"]) == 0
    assert codec.main(["compress", str(face), str(tmp_path / "m.fsd"), f"--model_dir={out}"]) == 0
    assert (tmp_path / "w.fsd").read_bytes() == (tmp_path / "m.fsd").read_bytes()
    # a workdir that is not a baseline run: refused by name
    assert convert.main(["--hyperprior_workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    # an earlier checkpoint and its last update's params (was: always the latest, auto)
    half = tmp_path / "half"
    assert convert.main(["--hyperprior_workdir", str(trained["a"]), "--out", str(half),
                         f"--step={STEPS // 2}", "--weights=params"]) == 0
    assert f"N=8 M=12 (step {STEPS // 2}, params weights)" in capsys.readouterr().out
    assert codec.main(["compress", str(face), str(tmp_path / "h.fsd"), f"--model_dir={half}"]) == 0
    assert codec.main(["compress", str(face), str(tmp_path / "hw.fsd"), f"--workdir={trained['a']}",
                       f"--step={STEPS // 2}", "--weights=params"]) == 0
    assert (tmp_path / "h.fsd").read_bytes() == (tmp_path / "hw.fsd").read_bytes()
    # each kind of folder given to the other flag: the message names the right one
    assert codec.main(["compress", str(face), str(tmp_path / "x.fsd"),
                       f"--model_dir={trained['a']}"]) == 2
    assert "a training workdir, not a converted model folder: pass it as --workdir" in \
        capsys.readouterr().err
    assert codec.main(["compress", str(face), str(tmp_path / "x.fsd"), f"--workdir={out}"]) == 2
    assert "a hyperprior folder is passed as --model_dir" in capsys.readouterr().err


@pytest.mark.xdist_group("baseline_training")
def test_a_checkpoint_exports_to_a_folder_for_coding(trained, tmp_path, capsys):
    """``codec export``: one checkpoint of a run (the latest, or --step=N|best) with its config
    and trained params only; it codes the same bytes as the run's workdir, and training does
    not resume from it."""
    work, out = trained["a"], tmp_path / "export"
    assert codec.main(["export", f"--workdir={work}", str(out)]) == 0
    assert f"checkpoint {STEPS} of {work} for coding" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints" / str(STEPS)).iterdir()
                  if p.is_dir()) == ["meta", "state"]  # no data iterator state
    assert set(train.one_device_target(out / "checkpoints" / str(STEPS) / "state")) == {"params"}
    face = tmp_path / "face.png"
    Image.fromarray(skdata.chelsea()[:90, :110]).save(face)
    for name, where in (("run", work), ("export", out)):
        assert codec.main(["compress", str(face), str(tmp_path / f"{name}.fsd"),
                           f"--workdir={where}"]) == 0
    assert (tmp_path / "run.fsd").read_bytes() == (tmp_path / "export.fsd").read_bytes()
    assert codec.main(["decompress", str(tmp_path / "run.fsd"), str(tmp_path / "face_out.png"),
                       f"--workdir={out}"]) == 0

    resumed = trained["held_out"].copy_and_resolve_references()
    resumed.train.steps = STEPS + 1
    with pytest.raises(train.TrainConfigError, match=rf"an export for coding of .*@{STEPS}"):
        train.train_and_evaluate(resumed, str(out))
    capsys.readouterr()
    assert codec.main(["export", f"--workdir={work}", str(out)]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    other = tmp_path / "other"  # another folder's files are not written over
    (other).mkdir()
    (other / "config.json").write_text("mine")
    assert codec.main(["export", f"--workdir={work}", str(other)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["config.json"]
    assert (other / "config.json").read_text() == "mine"
    inside = work / "checkpoints" / "999"  # would read as a damaged checkpoint of the run
    assert codec.main(["export", f"--workdir={work}", str(inside)]) == 2
    assert "inside the run's workdir" in capsys.readouterr().err and not inside.exists()
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert codec.main(["export", f"--workdir={work}", str(tmp_path / "empty")]) == 0
    assert codec.main(["export", f"--workdir={work}", "--step=best", str(tmp_path / "b")]) == 0
    assert codec.main(["export", f"--workdir={work}", "--model_dir=m", str(tmp_path / "c")]) == 2
    assert "not --model_dir" in capsys.readouterr().err


@pytest.mark.xdist_group("baseline_training")
def test_a_checkpoint_that_cannot_fit_is_refused_before_orbax_writes_it(
        trained, tmp_path, monkeypatch):
    """A save that ran out of space midway failed inside Orbax's threads (3,449 lines of
    tracebacks): a checkpoint whose arrays need more than the file system has free stops
    the run with one WriteError; the checkpoints before it stay and the run resumes."""
    work = tmp_path / "w"
    free = iter([1 << 40, 1000])  # room for checkpoint 1, then 1000 bytes
    monkeypatch.setattr(train, "free_bytes", lambda path: next(free))
    cfg = small_config(trained["source"], steps=2, checkpoint_every=1)
    with pytest.raises(train.WriteError, match=re.escape(
            f"{work}: checkpoint 2 needs about ")) as e:
        train.train_and_evaluate(cfg, str(work))
    assert "MiB and its file system has 0.0 MiB free" in str(e.value)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["1"]
    monkeypatch.setattr(train, "free_bytes", lambda path: None)  # a bucket: no figure
    assert train.train_and_evaluate(cfg, str(work))["step"] == 2


def test_processes_learn_of_each_others_failed_saves_and_the_fullest_disk_decides(
        monkeypatch):
    """Process 0's free space decided for all (another host's full local disk passed), and a
    process whose background write failed left alone while the others waited in the next
    collective. Now every process gathers (free MiB, failed) and all stop together."""
    from jax.experimental import multihost_utils

    class Manager:
        def __init__(self, error=None):
            self.error = error

        def wait_until_finished(self):
            if self.error:
                raise self.error

    others = {}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda mine: np.stack([mine, others["row"]]))
    monkeypatch.setattr(train, "free_bytes", lambda path: 100 << 20)
    check = functools.partial(train.finish_save_and_check_space, workdir="W", previous=4, at=5)
    others["row"] = np.float32([1.0, 0])  # the other host: 1 MiB free
    with pytest.raises(train.WriteError, match=r"checkpoint 5 needs about 3\.0 MiB and its "
                                               r"file system has 1\.0 MiB free"):
        check(Manager(), need=2 << 20)
    others["row"] = np.float32([-1.0, 1])  # its write of checkpoint 4 failed
    with pytest.raises(train.WriteError, match=r"W: checkpoint 4: process 1 could not write"):
        check(Manager(), need=1)
    full = OSError(28, "No space left on device")  # ours failed: our own error, after the gather
    with pytest.raises(train.WriteError, match=r"W: checkpoint 4: cannot write \(No space"):
        check(Manager(full), need=1)
    others["row"] = np.float32([200.0, 0])
    check(Manager(), need=1)  # both have room


@pytest.mark.xdist_group("baseline_training")
def test_an_export_to_a_relative_path_works_and_a_failed_one_leaves_nothing(
        trained, tmp_path, capsys, monkeypatch):
    """A relative export folder always failed (Orbax takes absolute paths only); one that
    failed part-way (disk full) left a half-written folder that every rerun refused."""
    work = trained["a"]
    monkeypatch.chdir(tmp_path)
    assert codec.main(["export", f"--workdir={work}", "rel"]) == 0
    assert (tmp_path / "rel" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]  # no temporary folder left

    def full(config, folder):
        raise OSError(28, "No space left on device")

    (tmp_path / "made").mkdir()  # a folder the user made: written in place, emptied on failure
    for name in ("full", "made"):
        with monkeypatch.context() as m:
            m.setattr(train, "save_run_config", full)
            assert codec.main(["export", f"--workdir={work}", name]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name}: cannot write (No space left on device)" in err
        assert "Traceback" not in err and ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made", "rel"]  # nothing half-written
    assert list((tmp_path / "made").iterdir()) == []
    assert codec.main(["export", f"--workdir={work}", "made"]) == 0
    from test_files import dead_pid

    killed = tmp_path / f"full.tmp-{dead_pid()}"  # what a kill -9 left: removed by the rerun
    (killed / "checkpoints").mkdir(parents=True)
    assert codec.main(["export", f"--workdir={work}", "full"]) == 0  # the rerun works
    assert (tmp_path / "full" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "made", "rel"]


@pytest.mark.xdist_group("baseline_training")
def test_a_fasdiff_config_does_not_load_the_baseline(trained):
    from configs import tiny

    with pytest.raises(train.TrainConfigError, match="another model kind"):
        train.restore_for_inference(tiny.get_config(), str(trained["a"]))


def test_unknown_model_kinds_are_refused():
    cfg = mbt2018_mean.get_config()
    cfg.model.kind = "mbt2018"
    with pytest.raises(train.TrainConfigError, match="config.model.kind='mbt2018'"):
        train.build_model(cfg.model)


def _damaged_copy(src, dst, how: str):
    """A copy of workdir ``src`` whose last checkpoint has every array data file cut in half
    (``"shard"``) or its array metadata made invalid JSON (``"metadata"``)."""
    shutil.copytree(src, dst)
    state = dst / "checkpoints" / str(STEPS) / "state"
    if how == "metadata":
        (state / "_METADATA").write_text("{")
    else:
        data = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
        assert data  # OCDBT's data files
        for p in data:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return dst


@pytest.mark.xdist_group("baseline_training")
@pytest.mark.parametrize("how", ["shard", "metadata"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's reads
# still in flight when the first one fails are dropped with their own traces
def test_damaged_checkpoints_are_one_readable_error(trained, tmp_path, capsys, how):
    """Truncated or corrupt checkpoint files: a CheckpointError naming the step, from the
    codec command (exit 2, nothing written), inference and a resumed training run alike."""
    from fasdiff_jax.errors import CheckpointError

    work = _damaged_copy(trained["a"], tmp_path / "w", how)
    with pytest.raises(CheckpointError, match=f"checkpoint {STEPS} cannot be read"):
        train.restore_for_inference(train.load_run_config(str(work)), str(work))
    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[:64, :64]).save(face)
    assert codec.main(["compress", str(face), str(tmp_path / "f.fsd"), f"--workdir={work}"]) == 2
    assert "damaged or incomplete" in capsys.readouterr().err
    assert not (tmp_path / "f.fsd").exists()
    with pytest.raises(CheckpointError, match=f"move checkpoints/{STEPS} aside"):
        train.train_and_evaluate(small_config(trained["source"], steps=STEPS + 1), str(work))


@pytest.mark.xdist_group("baseline_training")
def test_a_damaged_checkpoint_ends_the_command_in_one_error_line(trained, tmp_path):
    """Not followed by TensorStore's "Event loop is closed" tracebacks (it printed up to a
    page of them, from its reads still in flight when Orbax gave up)."""
    work = _damaged_copy(trained["a"], tmp_path / "w", "shard")
    face = tmp_path / "face.png"
    Image.fromarray(skdata.astronaut()[:64, :64]).save(face)
    run = subprocess.run(
        [sys.executable, "-m", "fasdiff_jax.codec", "compress", str(face),
         str(tmp_path / "f.fsd"), f"--workdir={work}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"checkpoint {STEPS} cannot be read" in run.stderr
    assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr


def test_only_late_callbacks_of_a_failed_read_are_silenced(monkeypatch):
    from fasdiff_jax.errors import CheckpointError

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))

    class RaisesWhenCollected:
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    RaisesWhenCollected("Event loop is closed")
    assert seen == ["Event loop is closed"]  # untouched before any checkpoint read
    with pytest.raises(CheckpointError, match="checkpoint 3 cannot be read"):
        with train._reading("w", 3):
            RaisesWhenCollected("Event loop is closed")  # before the error reaches us
            raise ValueError("OUT_OF_RANGE: Error reading byte range")
    assert seen == ["Event loop is closed"]
    RaisesWhenCollected("Event loop is closed")
    RaisesWhenCollected("another error")
    assert seen == ["Event loop is closed", "another error"]


def test_unretrieved_orbax_read_tasks_are_not_logged_after_a_failed_read(caplog):
    """asyncio logs "Task exception was never retrieved" (with a traceback) for read tasks
    that failed beside the one reported: after a checkpoint read those of Orbax's frames are
    dropped, others still logged."""
    import logging

    def failure(filename):  # an exception raised in code that lives in ``filename``
        try:
            exec(compile("raise ValueError('read failed')", filename, "exec"))
        except ValueError:
            return sys.exc_info()

    def report(filename):
        logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task>",
                                           exc_info=failure(filename))

    with pytest.raises(Exception):
        with train._reading("w", 3):
            raise ValueError("OUT_OF_RANGE")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        report("/site-packages/orbax/checkpoint/_src/serialization/fake.py")
        report("/somewhere/else.py")
        logging.getLogger("asyncio").error("Task exception was never retrieved")  # no traceback
    assert len(caplog.records) == 2 and "orbax" not in caplog.text


@pytest.mark.xdist_group("baseline_training")
def test_resuming_with_another_architecture_is_refused_before_restoring(trained, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained["a"], work)
    cfg = small_config(trained["source"], steps=STEPS + 1)
    cfg.model.N = 16
    with pytest.raises(train.TrainConfigError, match="does not fit this config's model"):
        train.train_and_evaluate(cfg, str(work))


@pytest.mark.xdist_group("baseline_training")
def test_a_resume_over_another_batch_order_is_warned_about(trained, embedded_dirs, tmp_path,  # noqa: F811
                                                           caplog):
    """A checkpoint keeps what fixed its batch order (records, seed, shuffle, batch size): a
    resume over the same order is silent, one over a source of another size or another seed
    still resumes, with a warning naming what changed (the same position now means other
    images)."""
    work = tmp_path / "w"

    def run(steps: int, **data) -> list[str]:
        cfg = small_config(trained["source"], steps=steps)
        cfg.data.update(**data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="absl"):
            assert train.train_and_evaluate(cfg, str(work))["step"] == steps
        return [r.getMessage() for r in caplog.records if "batch order" in r.getMessage()]

    assert run(1) == []
    with ocp.CheckpointManager(work / "checkpoints") as mngr:
        meta = mngr.restore(1, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    train_records = len(open_source(trained["source"]))
    heldout = f"prepared:{embedded_dirs['heldout']}"
    heldout_records = len(open_source(heldout))
    assert meta["data_order"] == {"records": train_records, "seed": 0, "shuffle": True,
                                  "global_batch_size": 8, "num_epochs": None}
    assert run(2) == []  # the same order: nothing to say
    [warned] = run(3, source=heldout, seed=5)
    assert ("checkpoint 2 was trained on another batch order" in warned
            and f"records {train_records} -> {heldout_records}" in warned
            and "seed 0 -> 5" in warned and heldout in warned), warned
    assert run(4, source=heldout, seed=5) == []  # checkpoint 3 holds the new order


@pytest.mark.xdist_group("baseline_training")
def test_a_finite_number_of_epochs_must_hold_a_batch_for_every_step(trained, tmp_path):
    """``data.num_epochs=1`` over 29 records in batches of 8 is 3 batches: 3 steps train, 4
    are refused before anything is written (they used to end in a bare StopIteration at the
    fourth step, after the compile and three steps)."""
    cfg = small_config(trained["source"], steps=3)
    cfg.data.num_epochs = 1
    assert train.train_and_evaluate(cfg, str(tmp_path / "a"))["step"] == 3
    cfg.train.steps = 4
    with pytest.raises(train.TrainConfigError, match=r"num_epochs=1 gives 3 batches of 8 "
                                                     r"\(29 records\), but config.train.steps=4"):
        train.train_and_evaluate(cfg, str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


@pytest.mark.xdist_group("baseline_training")
def test_a_resume_initialises_no_trainable_state(trained, tmp_path, monkeypatch):
    """A resume restores the trainable params and optimizer state into shapes, without
    initialising them first: they used to be drawn, compiled and placed (params, Adam's
    moments, any average) only to be dropped for the checkpoint's. (That the resumed run goes
    on exactly as the uninterrupted one: test_the_loop_trains_and_resumes_the_baseline.)"""
    work = tmp_path / "w"
    train.train_and_evaluate(small_config(trained["source"], steps=1), str(work))
    real, seen = train._restore, {}

    def spy(mngr, step, workdir, **items):
        if "state" in items:
            seen["target"] = jax.tree.leaves(items["state"].item)
        return real(mngr, step, workdir, **items)

    def no_init(*args, **kwargs):
        raise AssertionError("a resume initialised the params")

    monkeypatch.setattr(train, "_restore", spy)
    monkeypatch.setattr(H.TrainableHyperprior, "init_params", no_init)
    got = train.train_and_evaluate(small_config(trained["source"], steps=2), str(work))
    assert got["step"] == 2
    assert len(seen["target"]) > 100
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
               for x in seen["target"])
    # what decided between init and restore must still hold when the loop opens the workdir
    monkeypatch.undo()
    monkeypatch.setattr(train, "_latest_checkpoint", lambda d: None)
    with pytest.raises(train.TrainConfigError, match=r"checkpoints changed while this run "
                                                     r"started \(latest step None -> 2\)"):
        train.train_and_evaluate(small_config(trained["source"], steps=3), str(work))
