"""The commands' persistent compilation cache (``fasdiff_jax/compile_cache.py``): where it
goes, that a second command run loads its programs from it and codes the same bytes, and
that damaged entries only cost a recompile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache
from PIL import Image
from skimage import data as skdata

from fasdiff_jax import compile_cache
from fasdiff_jax.models import hyperprior as H

SETTINGS = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size",
            "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture
def jax_settings():
    """This test process's cache settings (conftest's), restored afterwards."""
    old = {name: getattr(jax.config, name) for name in SETTINGS}
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("FASDIFF_CACHE", str(tmp_path / "ours"))  # fasdiff_jax.cache_home
    assert compile_cache.default_dir() == str(tmp_path / "ours" / "xla")
    monkeypatch.delenv("FASDIFF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "fasdiff_jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_dir() == os.path.expanduser("~/.cache/fasdiff_jax/xla")


def test_where_the_cache_goes(jax_settings, monkeypatch, tmp_path):
    monkeypatch.delenv("FASDIFF_CACHE")  # conftest's, which the XDG default gives way to
    kept = jax.config.jax_compilation_cache_dir
    assert kept  # conftest's: a folder the process already has is kept when none is named
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.enable() == kept and jax.config.jax_compilation_cache_dir == kept

    named = tmp_path / "a" / "b"
    assert compile_cache.enable(str(named)) == str(named) and named.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(named)
    assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES  # -> file lock
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0

    assert compile_cache.enable("none") is None and not jax.config.jax_compilation_cache_dir
    assert compile_cache.enable() == str(tmp_path / "env")  # then the environment's
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    compile_cache.enable("none")
    assert compile_cache.enable() == str(tmp_path / "xdg" / "fasdiff_jax" / "xla")


def test_local_folders_are_locked_and_buckets_are_not():
    """JAX locks only a capped cache, and its lock is a local file: a gs:// folder must stay
    uncapped (a lock there would fail and make each compile wait out the lock timeout)."""
    assert compile_cache.jax_settings("/tmp/x")["jax_compilation_cache_max_size"] > 0
    remote = compile_cache.jax_settings("gs://bucket/xla")
    assert remote["jax_compilation_cache_dir"] == "gs://bucket/xla"
    assert remote["jax_compilation_cache_max_size"] == -1  # JAX's "no cap": no lock
    assert remote["jax_persistent_cache_min_compile_time_secs"] == 1.0  # no tiny uploads


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_an_unusable_folder_is_a_warning_not_a_failure(jax_settings, tmp_path, capsys, where):
    """Unwritable (here /proc/self, where even root cannot create files) matters most: JAX
    would make every compile wait 10 s for a lock file it cannot create."""
    if where == "unwritable" and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    (tmp_path / "file").write_text("")
    folder = str(tmp_path / "file" / "cache") if where == "under_a_file" else "/proc/self"
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable(folder) is None
    assert "is not a writable folder" in capsys.readouterr().err
    assert jax.config.jax_compilation_cache_dir == before


RUN_CODEC = """
import json, sys, jax
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
from fasdiff_jax import codec
rcs = [codec.main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"rcs": rcs, "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _run_codec(commands: list[list[str]]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run = subprocess.run([sys.executable, "-c", RUN_CODEC, json.dumps(commands)],
                         capture_output=True, text=True, timeout=300,
                         env={**env, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_second_run_loads_its_programs_and_codes_the_same_bytes(tmp_path):
    model = H.MeanScaleHyperprior(N=8, M=12)
    H.save_model(str(tmp_path / "mbt"), model, H.init_params(model, jax.random.key(0)))
    Image.fromarray(skdata.astronaut()[:96, :80]).save(tmp_path / "face.png")
    cache = tmp_path / "cache"

    def both(tag: str) -> dict:
        flags = [f"--model_dir={tmp_path / 'mbt'}", f"--compile_cache={cache}"]
        out = _run_codec([
            ["compress", str(tmp_path / "face.png"), str(tmp_path / f"{tag}.fsd"), *flags],
            ["decompress", str(tmp_path / f"{tag}.fsd"), str(tmp_path / f"{tag}.png"), *flags]])
        assert out["rcs"] == [0, 0]
        return {"hits": out["hits"], "fsd": (tmp_path / f"{tag}.fsd").read_bytes(),
                "png": (tmp_path / f"{tag}.png").read_bytes()}

    first = both("first")
    entries = sorted(cache.glob("*-cache"))
    assert first["hits"] == 0 and len(entries) >= 5, (first["hits"], entries)
    second = both("second")
    assert second["hits"] == len(entries), second["hits"]  # every program loaded, none compiled
    assert sorted(cache.glob("*-cache")) == entries
    assert (second["fsd"], second["png"]) == (first["fsd"], first["png"])

    for entry in entries:  # damaged entries (a run killed mid-write): the same bytes again
        entry.write_bytes(os.urandom(3000))
    damaged = both("damaged")
    assert (damaged["fsd"], damaged["png"]) == (first["fsd"], first["png"])
