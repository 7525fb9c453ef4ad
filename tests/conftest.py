"""Test setup: 8 fake CPU devices, so sharding code runs on a real (2x4) mesh.

The XLA flag must be set before jax is imported anywhere, hence here at the top.
"""

import os

# LLVM at -O0: the tests' tiny models spend far more time compiling than running (a first
# tiny FaSDiff run 85 -> 68 s here, the 20 steps after it no slower); results differ from
# -O2's only in float rounding, which every test tolerates as it tolerates other CPUs.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices8():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {devs}"
    return devs


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_per_worker(tmp_path_factory):
    """A persistent compilation cache private to this test process: every training run
    jits its steps afresh, and all but the first of the same program load the executable
    (a first FaSDiff train step compiles for ~30 s here). Private because JAX writes entries
    in place, so another process could read one half-written."""
    from jax.experimental.compilation_cache import compilation_cache

    from fasdiff_jax import compile_cache

    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    compilation_cache.reset_cache()
    # commands run as subprocesses share another one (locked), never the user's ~/.cache;
    # nor do the embedded dataset and memoised fingerprints (fasdiff_jax.cache_home)
    os.environ[compile_cache.ENV] = str(tmp_path_factory.mktemp("command_cache"))
    os.environ["FASDIFF_CACHE"] = str(tmp_path_factory.mktemp("fasdiff_cache"))
    yield
    jax.config.update("jax_compilation_cache_dir", old)
    compilation_cache.reset_cache()


@pytest.fixture(scope="session", autouse=True)
def xdist_groups_hold(request):
    """Under ``--dist loadgroup`` xdist sends a group to one worker by renaming its tests
    ``<id>@<group>``. When a pytest/xdist pairing stops doing that (pytest 9 with xdist 3.8)
    every worker silently rebuilds the shared training fixtures: fail fast instead."""
    if not getattr(request.config.option, "loadgroup", False):  # set inside xdist workers only
        return
    lost = [i.nodeid for i in request.session.items
            if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        pytest.fail(f"xdist_group is not applied (pytest {pytest.__version__}): {lost[0]} "
                    "would run outside its group; install the pytest pinned in setup.py")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``run_early`` (long ones that share no fixture) go first: under
    ``--dist loadgroup`` the groups are scheduled first, then single tests in collection
    order, so a long test collected last would end the run on one worker while the other
    idles (the two-process train test did: ~160 s alone at the end)."""
    items.sort(key=lambda item: item.get_closest_marker("run_early") is None)  # stable
