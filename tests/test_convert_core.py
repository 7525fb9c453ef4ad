"""The generic diffusers-key -> Flax-path rule and its strict checks, on a small Flax model."""

import builtins
import errno
import io
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fasdiff_jax import convert, safetensors_io
from fasdiff_jax.errors import ConversionError, UnsupportedConfigError
from fasdiff_jax.models import hyperprior, layers
from test_hyperprior import _compressai_state_dict


def test_key_to_path():
    assert convert.key_to_path("down_blocks.0.resnets.1.conv1.weight") == (
        ("down_blocks_0", "resnets_1", "conv1"), "weight")
    assert convert.key_to_path("a.attn1.to_out.0.bias") == (("a", "attn1", "to_out_0"), "bias")
    assert convert.key_to_path("mid_block.attentions.0.query.weight") == (
        ("mid_block", "attentions_0", "to_q"), "weight")
    assert convert.key_to_path("mid.proj_attn.bias") == (("mid", "to_out_0"), "bias")


class _TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList([torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 5)])


class _FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.Conv(8, 3, name="conv_in")(x)
        x = layers.GroupNorm(2, 1e-5, name="blocks_0")(x)
        return layers.Dense(5, name="blocks_1")(x)


def _state():
    torch.manual_seed(0)
    net = _TorchNet()
    for p in net.parameters():
        torch.nn.init.normal_(p)
    return net, {k: v.detach().numpy() for k, v in net.state_dict().items()}


def _expected():
    return nn.unbox(jax.eval_shape(lambda: _FlaxNet().init(jax.random.key(0), jnp.ones((1, 6, 6, 3))))["params"])


def test_convert_state_dict_matches_torch_numerics():
    net, state = _state()
    params = convert.convert_state_dict(state, _expected())
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    ours = _FlaxNet().apply({"params": params}, x)
    with torch.no_grad():
        h = net.blocks[0](net.conv_in(torch.from_numpy(x).permute(0, 3, 1, 2)))
        ref = net.blocks[1](h.permute(0, 2, 3, 1)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5)


def test_strict_errors_name_the_key():
    _, state = _state()
    bad = dict(state)
    bad["conv_in.weight"] = bad["conv_in.weight"][:4]
    with pytest.raises(ConversionError, match=r"conv_in\.weight: checkpoint \(4, 3, 3, 3\)"):
        convert.convert_state_dict(bad, _expected())
    missing = {k: v for k, v in state.items() if k != "blocks.1.bias"}
    with pytest.raises(ConversionError, match=r"missing from checkpoint:\n    blocks_1/bias"):
        convert.convert_state_dict(missing, _expected())
    extra = dict(state, **{"extra.layer.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected in checkpoint:\n    extra\.layer\.weight"):
        convert.convert_state_dict(extra, _expected())


def test_folder_errors(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert.load_diffusers(str(tmp_path))
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModelXL"}')
    with pytest.raises(UnsupportedConfigError, match="UNet2DConditionModelXL"):
        convert.load_diffusers(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="unreadable config"):
        convert.load_diffusers(str(tmp_path))


def test_sharded_index_errors_name_the_index(tmp_path):
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    for text, why in (('{"weight_map": ', "unreadable sharded-weights index"),
                      ('{"metadata": {}}', 'no "weight_map"'),
                      ('{"weight_map": {"a.weight": 3}}', 'no "weight_map"'),
                      ("[1, 2]", 'no "weight_map"')):
        index.write_text(text)
        with pytest.raises(ConversionError, match=rf"index\.json: .*{why}"):
            convert.read_weights(str(tmp_path))
    # A good index still reads every shard it names.
    safetensors_io.save_file({"a.weight": np.ones(2, np.float32)}, str(tmp_path / "s1.safetensors"))
    safetensors_io.save_file({"b.bias": np.zeros(3, np.float32)}, str(tmp_path / "s2.safetensors"))
    index.write_text(json.dumps({"weight_map": {"a.weight": "s1.safetensors",
                                                "b.bias": "s2.safetensors"}}))
    assert sorted(convert.read_weights(str(tmp_path))) == ["a.weight", "b.bias"]


@pytest.mark.parametrize("channels", ["abc", [], [320, "640"], [320, True], [0, 64]])
def test_block_out_channels_must_be_positive_integers(tmp_path, channels):
    (tmp_path / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "block_out_channels": channels}))
    with pytest.raises(ConversionError,
                       match="config.json: config field block_out_channels must be a list of "
                             "positive integers"):
        convert.load_diffusers(str(tmp_path))


_DDIM = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
         "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}


@pytest.mark.parametrize("text, why", [
    ("not json", "unreadable scheduler config"),
    ("[1, 2]", "scheduler config is not a JSON object"),
    (json.dumps({**_DDIM, "num_train_timesteps": "1000"}),
     "num_train_timesteps must be an integer"),
    (json.dumps({**_DDIM, "num_train_timesteps": 0}), "num_train_timesteps >= 1"),
    (json.dumps({**_DDIM, "clip_sample": 1}), "clip_sample must be true or false"),
    (json.dumps({**_DDIM, "prediction_type": None}), "prediction_type must be a string"),
    (json.dumps({**_DDIM, "beta_end": 1.5}), r"beta_end must be in \[0, 1\)"),
    (json.dumps({**_DDIM, "prediction_type": "flow"}), "prediction_type 'flow' is not supported"),
    (json.dumps({**_DDIM, "trained_betas": [0.1, 0.2]}), r"trained_betas has shape \(2,\)"),
])
def test_scheduler_config_errors_name_the_file(tmp_path, text, why):
    path = tmp_path / "scheduler_config.json"
    path.write_text(text)
    with pytest.raises(ConversionError, match=rf"scheduler_config\.json: .*{why}"):
        convert.read_scheduler_config(str(path))


def test_scheduler_config_accepts_sd_configs(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(_DDIM))
    assert convert.read_scheduler_config(str(path)) == _DDIM
    path.write_text(json.dumps({"prediction_type": "v_prediction"}))  # defaults for the rest
    assert convert.read_scheduler_config(str(path))["prediction_type"] == "v_prediction"


def test_load_component_names_the_config_of_a_missing_or_unknown_class(tmp_path):
    import re

    folder = tmp_path / "m"
    folder.mkdir()
    cfg = folder / "config.json"
    cfg.write_text("{}")
    with pytest.raises(ConversionError, match=re.escape(f"{cfg}: config.json names no model")):
        convert.load_component(str(folder))
    cfg.write_text('{"_class_name": "Nope"}')
    with pytest.raises(UnsupportedConfigError, match=re.escape(f"{cfg}: model class 'Nope'")):
        convert.load_component(str(folder))


class _FullDisk:
    """A file opened for writing on a disk with ``free[0]`` bytes left: a write past them
    stores what fits, then raises ENOSPC. No ``fileno``, so shutil copies through ``write``."""

    def __init__(self, f, free: list[int]):
        self._f, self._free = f, free

    def write(self, data):
        n = len(data)
        if n > self._free[0]:
            self._f.write(data[:self._free[0]])
            self._free[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._free[0] -= n
        return self._f.write(data)

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk(monkeypatch, free: int, only: str = "") -> None:
    """Fill the disk after ``free`` more bytes, for files whose name starts with ``only``."""
    real_open, left = builtins.open, [free]

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        if writing and os.path.basename(os.fspath(file)).startswith(only):
            return _FullDisk(f, left)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)


def test_save_file_on_a_full_disk_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    safetensors_io.save_file({"a": np.zeros(64, np.float32)}, path)
    old = path.read_bytes()
    for free in (0, 100):
        with monkeypatch.context() as m:
            full_disk(m, free)
            with pytest.raises(OSError, match=re.escape(f"No space left on device: '{path}'")):
                safetensors_io.save_file({"a": np.ones(64, np.float32)}, path)
        assert os.listdir(tmp_path) == ["w.safetensors"] and path.read_bytes() == old


def test_save_file_error_names_the_file_not_its_temp(tmp_path, capsys):
    """An output path that is a folder: the rename fails, and the message named the temp."""
    sd = _compressai_state_dict(8, 12)
    np.savez(tmp_path / "mbt.npz", **sd)
    out = tmp_path / "cm"
    (out / convert.PARAMS_FILE).mkdir(parents=True)
    assert convert.main(["--compressai_checkpoint", str(tmp_path / "mbt.npz"),
                         "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out / convert.PARAMS_FILE}: Is a directory\n"
    assert sorted(os.listdir(out)) == [convert.PARAMS_FILE]  # no temp, no config.json
    with pytest.raises(IsADirectoryError, match=re.escape(f"'{out / convert.PARAMS_FILE}'")):
        safetensors_io.save_file({"a": np.zeros(2, np.float32)}, out / convert.PARAMS_FILE)


@pytest.mark.parametrize("where", ["params", "mid-params", "config"])
def test_a_failed_conversion_leaves_the_old_folder_whole(tmp_path, capsys, monkeypatch, where):
    """A full disk part-way through config.json left 10 bytes of JSON next to new params."""
    for seed in (0, 1):
        np.savez(tmp_path / f"mbt{seed}.npz", **_compressai_state_dict(8, 12, seed=seed))
    out = tmp_path / "mbt"
    argv = ["--compressai_checkpoint", str(tmp_path / "mbt1.npz"), "--out", str(out)]
    assert convert.main(argv[:1] + [str(tmp_path / "mbt0.npz")] + argv[2:]) == 0
    capsys.readouterr()
    old = {p: (out / p).read_bytes() for p in os.listdir(out)}
    size = len(old[convert.PARAMS_FILE])
    free = {"params": 0, "mid-params": size // 2, "config": size + 10}[where]
    with monkeypatch.context() as m:
        full_disk(m, free)
        assert convert.main(argv) == 2
    failed = "config.json" if where == "config" else convert.PARAMS_FILE
    assert capsys.readouterr().err == f"error: {out / failed}: No space left on device\n"
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == old  # no temp left either
    model, params = hyperprior.load_model(str(out))
    assert (model.N, model.M) == (8, 12)
    from test_files import dead_pid

    dead = dead_pid()  # a kill -9 skips the cleanup: what it left goes with the rerun
    for name in (convert.PARAMS_FILE, "config.json"):
        (out / f"{name}.tmp-{dead}").write_bytes(b"half")
    assert convert.main(argv) == 0  # the rerun, with room, replaces both
    assert (out / convert.PARAMS_FILE).read_bytes() != old[convert.PARAMS_FILE]
    assert sorted(os.listdir(out)) == sorted(old)


def test_two_keys_for_one_parameter_are_refused_naming_both():
    """A VAE with both ``attentions.0.to_q.weight`` and the legacy ``query.weight``: one of
    the two was dropped silently (whichever sorted last won)."""
    want = {"mid": {"attentions_0": {"to_q": {"kernel": jax.ShapeDtypeStruct((2, 2),
                                                                           jnp.float32)}}}}
    state = {"mid.attentions.0.to_q.weight": np.eye(2, dtype=np.float32),
             "mid.attentions.0.query.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ConversionError, match=re.escape(
            "mid.attentions.0.query.weight and mid.attentions.0.to_q.weight: both map to "
            "mid/attentions_0/to_q/kernel")):
        convert.convert_state_dict(state, want)
    del state["mid.attentions.0.query.weight"]
    got = convert.convert_state_dict(state, want)
    np.testing.assert_array_equal(got["mid"]["attentions_0"]["to_q"]["kernel"], np.eye(2))


def test_variant_weights_are_read_with_variant_and_named_without(tmp_path):
    """diffusers' ``save_pretrained(variant="fp16")`` files: reported as missing weights."""
    one = {"a": np.ones(3, np.float32)}
    safetensors_io.save_file(one, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ConversionError, match=r"pass --variant fp16\)"):
        convert.read_weights(str(tmp_path))
    np.testing.assert_array_equal(convert.read_weights(str(tmp_path), "fp16")["a"], one["a"])
    with pytest.raises(ConversionError, match=r"no diffusion_pytorch_model\.bf16\.safetensors "
                                              r"or model\.bf16\.safetensors found"):
        convert.read_weights(str(tmp_path), "bf16")
    # sharded: diffusers names the index *.safetensors.index.fp16.json
    shard = tmp_path / "sh"
    safetensors_io.save_file(one, shard / "model.fp16-00001-of-00001.safetensors")
    (shard / "model.safetensors.index.fp16.json").write_text(json.dumps(
        {"weight_map": {"a": "model.fp16-00001-of-00001.safetensors"}}))
    with pytest.raises(ConversionError, match="pass --variant fp16"):
        convert.read_weights(str(shard))
    assert list(convert.read_weights(str(shard), "fp16")) == ["a"]


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    """``--out ""`` wrote into the current folder."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "mbt.npz", **_compressai_state_dict(8, 12))
    assert convert.main(["--compressai_checkpoint", "mbt.npz", "--out", ""]) == 2
    assert capsys.readouterr().err == "error: --out is empty: name the output folder\n"
    assert os.listdir(tmp_path) == ["mbt.npz"]
