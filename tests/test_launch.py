"""The launch scripts build the command every host runs: `gcloud`, `srun` and the remote
`python` are stand-ins that record their arguments, and the recorded command line is then
parsed by `fasdiff_jax.main`'s own flags (with the config file loaded and the overrides
applied), so a quoting slip or a flag main does not know fails here, not on a pod."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORD = """#!/usr/bin/env bash
exec "{py}" -c 'import json, os, sys
with open(sys.argv[1], "w") as f:
    json.dump({{"argv": sys.argv[2:], "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}}, f)' \\
  "{out}" "$@"
"""


def _recorder(bin_dir: Path, name: str, out: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    exe.write_text(RECORD.format(py=sys.executable, out=out))
    exe.chmod(0o755)


def _run(script: str, args: list[str], bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})


def _parsed_by_main(argv: list[str]) -> dict:
    """main's flags as absl parses ``argv`` (the config file loaded, overrides applied)."""
    code = (
        "import json, sys\n"
        "from fasdiff_jax import main\n"
        "main.FLAGS(['main', *sys.argv[1:]])\n"
        "c = main.FLAGS.config\n"
        "f = main.FLAGS\n"
        "print(json.dumps({'workdir': f.workdir, 'distributed': f.jax_distributed,"
        " 'kind': c.model.get('kind', 'fasdiff'), 'steps': c.train.steps,"
        " 'sd_checkpoint': c.model.get('sd_checkpoint')}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_tpu_pod_runs_main_on_every_worker_with_the_flags_intact(tmp_path):
    _recorder(tmp_path / "bin", "gcloud", tmp_path / "gcloud.json")
    sd = "/data/sd 2.1 ($HOME's)"  # not expanded or split by the workers' shell
    extra = [f"--config.model.sd_checkpoint={sd}", "--config.train.steps=5"]
    run = _run("tpu_pod.sh", ["fasdiff-v5e-32", "us-west4-a", "gs://bucket/run one",
                              "configs/celeba.py", *extra], tmp_path / "bin")
    assert run.returncode == 0, run.stderr
    argv = json.loads((tmp_path / "gcloud.json").read_text())["argv"]
    assert argv[:7] == ["compute", "tpus", "tpu-vm", "ssh", "fasdiff-v5e-32",
                        "--zone=us-west4-a", "--worker=all"]
    assert argv[7] == "--command" and len(argv) == 9

    # What each worker's shell does with the command: cd into the checkout, activate its venv
    # (here one whose `python` records its arguments), run main.
    home = tmp_path / "home"
    venv_bin = home / "fasdiff-jax" / ".venv" / "bin"
    _recorder(venv_bin, "python", tmp_path / "python.json")
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    remote = subprocess.run(["bash", "-c", argv[8]], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HOME": str(home)})
    assert remote.returncode == 0, remote.stderr
    py_argv = json.loads((tmp_path / "python.json").read_text())["argv"]
    assert py_argv == ["-m", "fasdiff_jax.main", "--jax_distributed", "--config=configs/celeba.py",
                       "--workdir=gs://bucket/run one", *extra]
    assert _parsed_by_main(py_argv[2:]) == {
        "workdir": "gs://bucket/run one", "distributed": True, "kind": "fasdiff", "steps": 5,
        "sd_checkpoint": sd}


def test_tpu_pod_defaults_to_the_celeba_config_and_explains_itself_without_arguments(tmp_path):
    _recorder(tmp_path / "bin", "gcloud", tmp_path / "gcloud.json")
    run = _run("tpu_pod.sh", ["tpu", "zone", "gs://b/w"], tmp_path / "bin")
    assert run.returncode == 0, run.stderr
    command = json.loads((tmp_path / "gcloud.json").read_text())["argv"][-1]
    assert "--config=configs/celeba.py --workdir=gs://b/w" in " ".join(shlex.split(command))

    run = _run("tpu_pod.sh", ["tpu", "zone", "gs://b/w", "--config.train.steps=3"],
               tmp_path / "bin")
    command = json.loads((tmp_path / "gcloud.json").read_text())["argv"][-1]
    assert run.returncode == 0 and shlex.split(command)[-3:] == [
        "--config=configs/celeba.py", "--workdir=gs://b/w", "--config.train.steps=3"]

    (tmp_path / "gcloud.json").unlink()
    for args in (["tpu", "zone"], ["tpu", "zone", ""], ["tpu", "zone", "--config.x=1"]):
        run = _run("tpu_pod.sh", args, tmp_path / "bin")
        assert run.returncode == 2 and "launch/tpu_pod.sh TPU_NAME ZONE WORKDIR" in run.stdout
        assert not (tmp_path / "gcloud.json").exists()


def test_gpu_slurm_starts_one_main_per_gpu_with_the_flags_intact(tmp_path):
    _recorder(tmp_path / "bin", "srun", tmp_path / "srun.json")
    extra = ["--config.train.steps=7", "--config.data.source=prepared:/shared/faces 256"]
    run = _run("gpu_slurm.sh", ["/shared/runs/mbt q4", "configs/mbt2018_mean.py", *extra],
               tmp_path / "bin")
    assert run.returncode == 0, run.stderr
    rec = json.loads((tmp_path / "srun.json").read_text())
    assert rec["mem_fraction"] == "0.9"
    assert rec["argv"] == ["--kill-on-bad-exit=1", "python", "-m", "fasdiff_jax.main",
                           "--jax_distributed", "--config=configs/mbt2018_mean.py",
                           "--workdir=/shared/runs/mbt q4", *extra]
    assert _parsed_by_main(rec["argv"][4:]) == {
        "workdir": "/shared/runs/mbt q4", "distributed": True, "kind": "hyperprior", "steps": 7,
        "sd_checkpoint": None}

    run = _run("gpu_slurm.sh", ["/w"], tmp_path / "bin", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5")
    rec = json.loads((tmp_path / "srun.json").read_text())
    assert run.returncode == 0 and rec["mem_fraction"] == "0.5"  # the user's setting is kept
    assert "--config=configs/celeba.py" in rec["argv"]

    # overrides without a CONFIG: the default config, the overrides kept as overrides
    run = _run("gpu_slurm.sh", ["/w", "--config.train.steps=3"], tmp_path / "bin")
    rec = json.loads((tmp_path / "srun.json").read_text())
    assert run.returncode == 0 and rec["argv"][-3:] == [
        "--config=configs/celeba.py", "--workdir=/w", "--config.train.steps=3"]

    (tmp_path / "srun.json").unlink()
    for args in ([], [""], ["--help"], ["--config.train.steps=3"]):  # no WORKDIR: usage
        run = _run("gpu_slurm.sh", args, tmp_path / "bin")
        assert run.returncode == 2 and "sbatch --nodes=4" in run.stdout, args
        assert "#SBATCH" not in run.stdout and run.stdout.rstrip().endswith("/shared/path/xla.")
        assert not (tmp_path / "srun.json").exists()


def test_a_half_set_cluster_environment_is_one_error_line(tmp_path):
    """``--jax_distributed`` with JAX_NUM_PROCESSES but no JAX_PROCESS_ID was a KeyError
    traceback; without JAX_COORDINATOR_ADDRESS a ValueError from inside JAX."""
    import pytest

    from fasdiff_jax.main import distributed_settings

    full = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3"}
    assert distributed_settings(full) == dict(coordinator_address="10.0.0.1:1234",
                                              num_processes=4, process_id=3)
    assert distributed_settings({}) == {}  # TPU VMs, SLURM: JAX finds them
    assert distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
    for env, message in (
            ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES set but not JAX_COORDINATOR_ADDRESS "
                                         "and JAX_PROCESS_ID: set all three"),
            ({**full, "JAX_PROCESS_ID": "x"}, "JAX_NUM_PROCESSES='4' and JAX_PROCESS_ID='x' must "
                                              "be whole numbers"),
            ({**full, "JAX_PROCESS_ID": "4"},
             "JAX_PROCESS_ID=4 must be in 0..JAX_NUM_PROCESSES-1")):
        with pytest.raises(ValueError, match=message):
            distributed_settings(env)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    run = subprocess.run(
        [sys.executable, "-m", "fasdiff_jax.main", "--jax_distributed",
         f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={tmp_path / 'w'}"], cwd=REPO,
        capture_output=True, text=True, timeout=300,
        env={**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.endswith(
        "error: --jax_distributed: JAX_NUM_PROCESSES set but not JAX_COORDINATOR_ADDRESS and "
        "JAX_PROCESS_ID: set all three (or none on Cloud TPU VMs and under SLURM, where JAX "
        "finds them)\n"), run.stderr[-2000:]
    assert "Traceback" not in run.stderr and not (tmp_path / "w").exists()
