#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU (srun), all GPUs of all nodes in one mesh.
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/gpu_slurm.sh WORKDIR \
#       [CONFIG] [extra --config.x=y flags...]
#
# --jax_distributed makes main call jax.distributed.initialize(), which reads the coordinator
# (first node), process count and process id from SLURM's environment and binds each process
# to its local GPU. Run from the repo root with the venv active; WORKDIR must be on a file
# system every node sees. Compiled programs go to ~/.cache/fasdiff_jax/xla (JAX writes them
# from process 0 only): if home is not shared, add --compile_cache=/shared/path/xla.
#SBATCH --job-name=fasdiff
#SBATCH --exclusive
set -euo pipefail
# WORKDIR must be given (not empty, not a flag); CONFIG may be left out before the overrides.
if [ $# -lt 1 ] || [ -z "$1" ] || [[ $1 == -* ]]; then sed -n 2,11p "$0"; exit 2; fi
WORKDIR=$1; shift; CONFIG=configs/celeba.py
if [ $# -gt 0 ] && [[ $1 != -* ]]; then CONFIG=$1; shift; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 python -m fasdiff_jax.main --jax_distributed \
  --config="$CONFIG" --workdir="$WORKDIR" "$@"
