#!/usr/bin/env bash
# N jaxpoison processes on this machine as one multi-process job, each with its own CPU devices: the same
# code path as a pod or a SLURM job (jax.distributed over 127.0.0.1, gloo collectives), for testing.
#
#   bash launch/local_multiprocess.sh N CONFIG --out DIR [run args]     N x `python -m jaxpoison run ...`
#   bash launch/local_multiprocess.sh N --exec COMMAND [ARGS]           N x any command (a test job, a script)
#
# Environment: DEVICES_PER_PROCESS (default 4) CPU devices per process; PORT (default: a free one) for the
# coordinator; LOG_DIR (default runs/multiprocess-logs) gets p<i>.log per process. Process 0's output is also
# shown here. The first process to fail stops the others; the exit status is the first non-zero one.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: local_multiprocess.sh N CONFIG --out DIR [run args] | N --exec COMMAND...}
shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "error: N must be a positive whole number, got '$N'" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ "${1:-}" = "--exec" ]; then shift; cmd=("$@"); else cmd=("$PY" -m jaxpoison run "$@"); fi
[ ${#cmd[@]} -gt 0 ] || { echo "error: nothing to run" >&2; exit 2; }
DEV=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-runs/multiprocess-logs}
mkdir -p "$LOG_DIR"
# each process gets DEV devices, whatever the caller's XLA_FLAGS said about the device count
flags="$(printf '%s' "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g') --xla_force_host_platform_device_count=$DEV"

pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop; exit 130' INT TERM
for ((i = 0; i < N; i++)); do
  env XLA_FLAGS="$flags" JAX_PLATFORMS=cpu JAXPOISON_COORDINATOR="127.0.0.1:$PORT" JAXPOISON_NUM_PROCESSES="$N" \
      JAXPOISON_PROCESS_ID="$i" "${cmd[@]}" > "$LOG_DIR/p$i.log" 2>&1 &
  pids+=($!)
done
echo "started $N processes x $DEV CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR/p<i>.log" >&2
tail -n +1 -f "$LOG_DIR/p0.log" --pid="${pids[0]}" >&2 &
tailer=$!
status=0
running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
  # the first child to end; a failure stops the rest at once (jax's heartbeats would, but only later)
  done_pid=
  set +e; wait -n -p done_pid "${running[@]}"; rc=$?; set -e
  rest=(); for p in "${running[@]}"; do [ "$p" = "$done_pid" ] || rest+=("$p"); done; running=("${rest[@]}")
  if [ "$rc" -ne 0 ]; then
    status=$rc
    echo "a process exited with status $rc: stopping the others (see $LOG_DIR)" >&2
    stop
    wait "${running[@]}" 2> /dev/null || true
    break
  fi
done
wait "$tailer" 2>/dev/null || true
exit $status
