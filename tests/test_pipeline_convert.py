"""Whole-pipeline conversion: unet + vae + empty-prompt embedding, against diffusers/transformers."""

from __future__ import annotations

import json
import os

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

from fasdiff_jax import convert
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


def test_a_full_disk_leaves_the_old_scheduler_config_whole(tmp_path, capsys, monkeypatch):
    """The scheduler config was copied in place: a full disk left half a JSON file, which
    every later training build refused."""
    src, out = tmp_path / "sd", tmp_path / "ckpt"
    for component in ("unet", "vae"):  # any model folder converts; a tiny VAE is cheapest
        _tiny_vae_folder(src / component)
    sched = src / "scheduler" / "scheduler_config.json"
    sched.parent.mkdir()
    sched.write_text(json.dumps({"prediction_type": "epsilon"}))
    argv = ["--diffusers_dir", str(src), "--out", str(out)]
    assert convert.main(argv) == 0
    old = (out / "scheduler" / "scheduler_config.json").read_bytes()
    sched.write_text(json.dumps({"prediction_type": "v_prediction"}))
    with monkeypatch.context() as m:
        full_disk(m, 10, only="scheduler_config.json")
        assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'scheduler' / 'scheduler_config.json'}: No space left on device\n"
    assert os.listdir(out / "scheduler") == ["scheduler_config.json"]  # no temp left
    assert (out / "scheduler" / "scheduler_config.json").read_bytes() == old
    assert convert.main(argv) == 0
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == {
        "prediction_type": "v_prediction"}
