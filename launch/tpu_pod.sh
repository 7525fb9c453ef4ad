#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every host (worker) at once.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [CONFIG] [extra --config.x=y flags...]
#   e.g. launch/tpu_pod.sh fasdiff-v5e-32 us-west4-a gs://bucket/fasdiff configs/celeba.py \
#          --config.model.sd_checkpoint=/data/sd21
#
# Assumes the repo is checked out at ~/fasdiff-jax on every worker with its venv in .venv
# (install with the same --command once), and that data and the SD checkpoint are readable
# from every worker. --jax_distributed makes main call jax.distributed.initialize(), which
# finds the coordinator and process ids itself on TPU VMs. WORKDIR should be shared (GCS):
# Orbax writes one checkpoint from all hosts; only process 0 writes summaries. JAX writes
# compiled programs from process 0 only, so for a restarted run to skip compiling on every
# worker, add --compile_cache=gs://bucket/xla (one cache all workers read).
set -euo pipefail
# TPU_NAME, ZONE, WORKDIR must be given (not empty, not flags); CONFIG may be left out.
if [ $# -lt 3 ] || [ -z "$1" ] || [ -z "$2" ] || [ -z "$3" ] || [[ $1 == -* || $2 == -* || $3 == -* ]]; then
  sed -n 2,14p "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; WORKDIR=$3; shift 3; CONFIG=configs/celeba.py
if [ $# -gt 0 ] && [[ $1 != -* ]]; then CONFIG=$1; shift; fi
# Quoted for the workers' shell: paths and overrides may hold spaces or shell characters.
ARGS=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  cd ~/fasdiff-jax && . .venv/bin/activate &&
  python -m fasdiff_jax.main --jax_distributed$ARGS"
