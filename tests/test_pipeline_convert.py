"""Whole-pipeline conversion: unet + vae + empty-prompt embedding, against diffusers/transformers."""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as TorchUNet
from transformers import CLIPTextConfig, CLIPTokenizer
from transformers import CLIPTextModel as TorchCLIP

from fasdiff_jax import convert, files
from fasdiff_jax.errors import ConversionError
from fasdiff_jax.models.sd import text_encoder
from test_convert_core import full_disk

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=12, bos_token_id=50,
            eos_token_id=51, pad_token_id=51)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _save_tokenizer(folder: str, pad: str) -> CLIPTokenizer:
    """A tiny CLIP BPE tokenizer: printable ASCII plus the two special tokens."""
    os.makedirs(folder, exist_ok=True)
    vocab = {chr(c): i for i, c in enumerate(range(33, 33 + 50))}
    vocab.update({"<|startoftext|>": 50, "<|endoftext|>": 51})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        pad_token=pad, model_max_length=TEXT["max_position_embeddings"])
    tok.save_pretrained(folder)
    return tok


def _reference_null_text(tok: CLIPTokenizer, model: TorchCLIP) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline.encode_prompt computes for ``""``."""
    ids = tok("", padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids)[0].numpy()


@pytest.mark.parametrize("act, pad", [("quick_gelu", "<|endoftext|>"), ("gelu", "!")])
def test_null_text_embedding_matches_transformers(tmp_path, act, pad):
    model = _randomize(TorchCLIP(CLIPTextConfig(hidden_act=act, **TEXT)))
    model.save_pretrained(str(tmp_path / "text_encoder"), safe_serialization=True)
    tok = _save_tokenizer(str(tmp_path / "tokenizer"), pad)
    ref = _reference_null_text(tok, model)
    ids = text_encoder.empty_prompt_ids(str(tmp_path / "tokenizer"))
    assert ids.tolist() == tok("", padding="max_length", max_length=12).input_ids
    ours = text_encoder.null_text_embedding_from_pipeline(str(tmp_path))
    assert ours.shape == ref.shape == (1, 12, 32)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_convert_pipeline_cli_round_trip(tmp_path):
    src, out = tmp_path / "sd", tmp_path / "ckpt"
    unet = _randomize(TorchUNet(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4))
    unet.save_pretrained(str(src / "unet"), safe_serialization=True)
    vae = _randomize(TorchVAE(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                              down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2))
    vae.save_pretrained(str(src / "vae"), safe_serialization=True)
    clip = _randomize(TorchCLIP(CLIPTextConfig(**TEXT)))
    clip.save_pretrained(str(src / "text_encoder"), safe_serialization=True)
    tok = _save_tokenizer(str(src / "tokenizer"), "<|endoftext|>")
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(str(src / "scheduler"))

    assert convert.main(["--diffusers_dir", str(src), "--out", str(out)]) == 0
    null = np.asarray(convert.load_null_text_embedding(str(out)))
    ref = _reference_null_text(tok, clip)
    assert np.abs(null - ref).max() <= 1e-4 * np.abs(ref).max()
    with open(out / "scheduler" / "scheduler_config.json") as f:
        assert json.load(f)["prediction_type"] == "v_prediction"

    # The converted UNet reproduces diffusers' output with the stored null-text embedding.
    module, params = convert.load_component(str(out / "unet"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = unet(x, torch.tensor([500]), torch.from_numpy(ref)).sample.permute(0, 2, 3, 1)
    got = jax.jit(module.apply)({"params": params}, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                                jnp.array([500]), null)
    assert np.abs(np.asarray(got) - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()
    vmod, vparams = convert.load_component(str(out / "vae"))
    _, vref = convert.load_diffusers(str(src / "vae"))
    jax.tree.map(np.testing.assert_array_equal, vparams, vref)

    # a scheduler config damaged after conversion: the model build names the file
    from configs import tiny
    from fasdiff_jax.models import fasdiff

    sched = out / "scheduler" / "scheduler_config.json"
    sched.write_text("not json")
    model_cfg = {**tiny.get_config().model.to_dict(), "sd_checkpoint": str(out)}
    with pytest.raises(convert.ConversionError, match=f"{sched}: unreadable scheduler config"):
        fasdiff.build(model_cfg)


def test_pipeline_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert convert.main(["--diffusers_dir", str(tmp_path / "empty"), "--out",
                         str(tmp_path / "o")]) == 2
    assert "has no unet/" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="no vocab.json"):
        text_encoder.empty_prompt_ids(str(tmp_path / "empty"))
    with pytest.raises(ConversionError, match="no null_text_embedding"):
        convert.load_null_text_embedding(str(tmp_path / "empty"))
    with pytest.raises(ConversionError, match="no params.safetensors"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "config.json").write_text(json.dumps(
            {"_class_name": "AutoencoderKL", "block_out_channels": [8], "norm_num_groups": 4}))
        convert.load_component(str(tmp_path / "c"))


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _tiny_vae_folder(folder) -> None:
    TorchVAE(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
             layers_per_block=1).save_pretrained(str(folder), safe_serialization=True)


def test_out_overlapping_the_input_is_refused_before_writing(tmp_path, capsys):
    src = tmp_path / "sd"
    (src / "unet").mkdir(parents=True)
    (src / "vae").mkdir()
    (tmp_path / "afile").write_text("x")
    before = _files(src)
    for out, why in ((src, "is the input folder"), (src / "unet", "lies inside the input folder"),
                     (tmp_path, "holds the input folder"), (tmp_path / "afile", "is a file")):
        assert convert.main(["--diffusers_dir", str(src), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: {why}") and "Traceback" not in err
    # A single model folder converted into itself: refused, nothing added to it.
    _tiny_vae_folder(tmp_path / "vae")
    model_files = _files(tmp_path / "vae")
    assert convert.main(["--diffusers_dir", str(tmp_path / "vae"), "--out",
                         str(tmp_path / "vae")]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert _files(tmp_path / "vae") == model_files
    assert _files(src) == before


def test_out_under_a_file_is_one_error_line(tmp_path, capsys):
    _tiny_vae_folder(tmp_path / "vae")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    assert convert.main(["--diffusers_dir", str(tmp_path / "vae"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: Not a directory\n"


@pytest.mark.parametrize("text, why", [("not json", "unreadable scheduler config"),
                                       ('{"beta_schedule": 3}', "beta_schedule must be a string")])
def test_bad_scheduler_config_is_refused_before_writing(tmp_path, capsys, text, why):
    src, out = tmp_path / "sd", tmp_path / "ckpt"
    (src / "scheduler").mkdir(parents=True)
    (src / "scheduler" / "scheduler_config.json").write_text(text)
    assert convert.main(["--diffusers_dir", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src / 'scheduler' / 'scheduler_config.json'}: ") and why in err
    assert not out.exists()


def test_hyperprior_workdir_errors_do_not_advise_a_missing_flag(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1]")
    for workdir, why in ((tmp_path / "nope", "no config.json"),
                         (tmp_path / "run", "no config.json"),
                         (tmp_path / "bad", "not a run config")):
        assert convert.main(["--hyperprior_workdir", str(workdir), "--out",
                             str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {workdir}") and why in err
        assert "--config" not in err and "configs/mbt2018_mean.py" in err
    assert not (tmp_path / "o").exists()


def _make_pipeline(dst, seed: int, prediction: str) -> None:
    """A tiny SD pipeline folder as diffusers saves one (the audit's ``mk.py``)."""
    _randomize(TorchUNet(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4), seed).save_pretrained(str(dst / "unet"), safe_serialization=True)
    _randomize(TorchVAE(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2), seed + 1).save_pretrained(
        str(dst / "vae"), safe_serialization=True)
    _randomize(TorchCLIP(CLIPTextConfig(**TEXT)), seed + 2).save_pretrained(
        str(dst / "text_encoder"), safe_serialization=True)
    _save_tokenizer(str(dst / "tokenizer"), "<|endoftext|>")
    DDIMScheduler(prediction_type=prediction).save_pretrained(str(dst / "scheduler"))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Two tiny pipelines of one shape (``a``: epsilon, ``b``: v_prediction) and their
    conversions (``a_out``, ``b_out``), to tell which set a folder holds."""
    root = tmp_path_factory.mktemp("pipelines")
    for name, seed, pred in (("a", 0, "epsilon"), ("b", 7, "v_prediction")):
        _make_pipeline(root / name, seed, pred)
        assert convert.main(["--diffusers_dir", str(root / name), "--out",
                             str(root / f"{name}_out")]) == 0
    return root


def _contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_full_disk_leaves_the_old_set_whole(tmp_path, capsys, monkeypatch, pipelines):
    """Components were written one after another into --out: a full disk after the new
    UNet (or at the scheduler config) left it with the old VAE, null text and scheduler, a
    mixture of two models that loads without complaint."""
    out = tmp_path / "ckpt"
    shutil.copytree(pipelines / "a_out", out)
    old = _contents(out)
    unet_size = len(old[f"unet/{convert.PARAMS_FILE}"])
    argv = ["--diffusers_dir", str(pipelines / "b"), "--out", str(out)]
    for only, free, failed in ((convert.PARAMS_FILE, unet_size + 10, f"vae/{convert.PARAMS_FILE}"),
                               ("scheduler_config.json", 10, "scheduler/scheduler_config.json")):
        with monkeypatch.context() as m:
            full_disk(m, free, only=only)
            assert convert.main(argv) == 2
        assert capsys.readouterr().err == f"error: {out / failed}: No space left on device\n"
        assert _contents(out) == old  # the whole old set, nothing new
        assert os.listdir(tmp_path) == ["ckpt"]  # the new set's temporary folder is gone
    assert convert.main(argv) == 0
    assert _contents(out) == _contents(pipelines / "b_out")
    assert os.listdir(tmp_path) == ["ckpt"]


def test_a_kill_during_the_swap_leaves_a_whole_set_and_a_rerun_cleans_up(tmp_path, pipelines,
                                                                         monkeypatch):
    """What a ``kill -9`` leaves at each point (the writer's pid no longer runs): the
    folder a rerun finds is one whole set, never a mixture, and the leftovers go."""
    from test_files import dead_pid

    out, dead = tmp_path / "ckpt", dead_pid()
    tmp_new = files.temp_name(str(out)).rsplit("-", 1)[0] + f"-{dead}"  # a killed run's
    aside = files.temp_name(f"{out}.old").rsplit("-", 1)[0] + f"-{dead}"
    a_set, b_set = _contents(pipelines / "a_out"), _contents(pipelines / "b_out")
    argv = ["--diffusers_dir", str(pipelines / "b"), "--out", str(out)]
    # killed while writing the new set (after its UNet): --out untouched, the half set goes
    shutil.copytree(pipelines / "a_out", out)
    shutil.copytree(pipelines / "b_out" / "unet", f"{tmp_new}/unet")
    assert convert.main(["--diffusers_dir", str(pipelines / "a"), "--out", str(out)]) == 0
    assert _contents(out) == a_set and os.listdir(tmp_path) == ["ckpt"]
    # killed between the two renames: no --out, the old set aside and the new one whole
    shutil.move(str(out), aside)
    shutil.copytree(pipelines / "b_out", tmp_new)
    with pytest.raises(ConversionError, match="not a folder|config.json"):
        convert.read_config(str(out / "unet"))  # nothing half there to be used
    bad = ["--diffusers_dir", str(tmp_path / "none"), "--out", str(out)]
    assert convert.main(bad) == 2  # even a run that fails...
    assert convert.main(argv[:1] + [str(pipelines / "a")] + argv[2:]) == 0  # ...or succeeds
    assert _contents(out) == a_set and os.listdir(tmp_path) == ["ckpt"]
    shutil.move(str(out), aside)
    shutil.copytree(pipelines / "b_out", tmp_new)
    (tmp_path / "none").mkdir()
    assert convert.main(bad) == 2  # a failing rerun puts the old set back
    assert _contents(out) == a_set and sorted(os.listdir(tmp_path)) == ["ckpt", "none"]
    # killed after the second rename: the new set in place, the old one aside goes
    shutil.copytree(pipelines / "a_out", aside)
    assert convert.main(argv) == 0
    assert _contents(out) == b_set and sorted(os.listdir(tmp_path)) == ["ckpt", "none"]
    if files._BOOT:  # killed between the renames, then a reboot gave its pid to another
        machine = aside.rsplit(".tmp-", 1)[1].rsplit("@", 1)[0]
        earlier = "0" * 8 if files._BOOT != "0" * 8 else "1" * 8
        before_boot = f"{out}.old.tmp-{machine}@{earlier}-1"  # (pid 1 always runs)
        shutil.move(str(out), before_boot)
        monkeypatch.setattr(files, "_boot_time", lambda: time.time() + 60)  # (rebooted since)
        assert convert.main(bad) == 2
        assert _contents(out) == b_set and sorted(os.listdir(tmp_path)) == ["ckpt", "none"]


def test_a_failed_swap_puts_the_old_set_back(tmp_path, capsys, monkeypatch, pipelines):
    out = tmp_path / "ckpt"
    shutil.copytree(pipelines / "a_out", out)
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new set into place
            raise OSError(13, "Permission denied", b)
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    assert convert.main(["--diffusers_dir", str(pipelines / "b"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: Permission denied\n"
    assert _contents(out) == _contents(pipelines / "a_out")
    assert os.listdir(tmp_path) == ["ckpt"]


def test_files_convert_did_not_write_are_never_deleted(tmp_path, capsys, pipelines):
    """Convert replaces --out as a whole: a folder holding anything else is refused."""
    out = tmp_path / "ckpt"
    shutil.copytree(pipelines / "a_out", out)
    (out / "notes.txt").write_text("mine")
    (out / "unet" / "extra.bin").write_text("mine")
    before = _contents(out)
    assert convert.main(["--diffusers_dir", str(pipelines / "b"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: holds files that a pipeline conversion did not "
                          f"write: {out / 'notes.txt'}; {out / 'unet' / 'extra.bin'};")
    assert _contents(out) == before and os.listdir(tmp_path) == ["ckpt"]
    for extra in (out / "notes.txt", out / "unet" / "extra.bin"):
        extra.unlink()
    leftover = files.temp_name(str(out / "unet" / convert.PARAMS_FILE)).rsplit("-", 1)[0]
    with open(leftover + "-1", "w") as f:  # a killed run's temp (pid 1: not ours)
        f.write("old temp")
    (tmp_path / "empty").mkdir()  # an empty folder, and a previous conversion, are replaced
    for folder in (out, tmp_path / "empty"):
        assert convert.main(["--diffusers_dir", str(pipelines / "b"), "--out", str(folder)]) == 0
        assert _contents(folder) == _contents(pipelines / "b_out")


@pytest.mark.parametrize("drop, why", [
    ("scheduler", "has no scheduler/scheduler_config.json"),
    ("text_encoder", "has no text_encoder/"), ("tokenizer", "has no tokenizer/"),
    ("width", "text_encoder hidden_size 48 != unet cross_attention_dim 32")])
def test_an_incomplete_pipeline_is_refused_before_writing(tmp_path, capsys, pipelines, drop,
                                                          why):
    """Without scheduler/ training used Schedule.create's defaults (not SD's); without
    text_encoder/ no null text was written (exit 0); without tokenizer/ the error came after
    the UNet and VAE were written; another width failed in the first training step."""
    src, out = tmp_path / "sd", tmp_path / "ckpt"
    shutil.copytree(pipelines / "a", src)
    shutil.copytree(pipelines / "b_out", out)
    if drop == "width":
        cfg = json.loads((src / "text_encoder" / "config.json").read_text())
        (src / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
    else:
        shutil.rmtree(src / drop)
    assert convert.main(["--diffusers_dir", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and why in err and err.count("\n") == 1
    assert _contents(out) == _contents(pipelines / "b_out")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "sd"]


def test_variant_pipelines_convert_with_variant(tmp_path, capsys, pipelines):
    """diffusers' fp16 variant files were reported as missing weights, with no way to read
    them."""
    src = tmp_path / "sd"
    shutil.copytree(pipelines / "a", src)
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        os.rename(src / part / f"{name}.safetensors", src / part / f"{name}.fp16.safetensors")
    argv = ["--diffusers_dir", str(src), "--out", str(tmp_path / "o")]
    assert convert.main(argv) == 2
    assert "(it has variant weights: pass --variant fp16)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert convert.main(argv + ["--variant", "fp16"]) == 0
    assert _contents(tmp_path / "o") == _contents(pipelines / "a_out")


def test_what_is_not_a_pipeline_folder_is_named(tmp_path, capsys):
    (tmp_path / "sd.safetensors").write_bytes(b"x")
    for src, why in ((tmp_path / "nope", "does not exist"),
                     (tmp_path / "sd.safetensors", "is a file; single-file checkpoints "
                                                   "(.safetensors, .ckpt) are not supported")):
        assert convert.main(["--diffusers_dir", str(src), "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.startswith(f"error: --diffusers_dir {src}: {why}")
    assert convert.main(["--diffusers_dir", str(tmp_path / "nope"), "--out", ""]) == 2
    assert capsys.readouterr().err == "error: --out is empty: name the output folder\n"
    assert sorted(os.listdir(tmp_path)) == ["sd.safetensors"]


def test_an_out_the_swap_cannot_replace_is_refused_before_reading(tmp_path, capsys,
                                                                  monkeypatch, pipelines):
    """``--out link/`` (a trailing slash) replaced the user's link by a real folder on the
    link's file system, the old set left behind it; a mount point was written beside, on
    another file system, then refused with EBUSY; ``--out .`` renamed the current folder."""
    target = tmp_path / "big" / "ckpt"
    shutil.copytree(pipelines / "a_out", target)
    (tmp_path / "link").symlink_to(target)
    argv = ["--diffusers_dir", str(pipelines / "b")]
    assert convert.main(argv + ["--out", f"{tmp_path / 'link'}/"]) == 0
    assert (tmp_path / "link").is_symlink() and _contents(target) == _contents(
        pipelines / "b_out")
    assert sorted(os.listdir(tmp_path)) == ["big", "link"]
    assert os.listdir(tmp_path / "big") == ["ckpt"]
    monkeypatch.chdir(target)
    for out, why in ((".", "is the current folder or holds it"),
                     (str(tmp_path / "big"), "is the current folder or holds it")):
        assert convert.main(argv + ["--out", out]) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {out}: {why}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os.path, "ismount", lambda p: p == str(target))
    assert convert.main(argv + ["--out", str(target)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {target}: is a mount point")
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(tmp_path / "big"))
    assert convert.main(argv + ["--out", str(target)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --out {target}: its folder {tmp_path / 'big'} is not writable")
    assert _contents(target) == _contents(pipelines / "b_out")
