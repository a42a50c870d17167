#!/usr/bin/env bash
# launch/multinode.sh: start an ofa_ds script on every node of a hostfile through DeepSpeed's runner.
#
#   launch/multinode.sh [options] [--] SCRIPT [SCRIPT ARGS...]
#   launch/multinode.sh --hostfile launch/hostfile --zero 3 -- launch/pretrain.py --recipe pretrain_large
#
# Launchers (--launcher):
#   pdsh     (default) one command on the launch node; pdsh ssh-es to every host, this one included.
#   openmpi  mpirun over ssh; each rank maps OMPI_COMM_WORLD_* to RANK/WORLD_SIZE/LOCAL_RANK and rendezvous at
#            MASTER_ADDR:MASTER_PORT from the env file (no mpi4py needed).
#   no_ssh   per-node launch: run this script once on every node with --node-rank N (SLURM: srun does it,
#            see launch/slurm.sbatch). No ssh at all.
#
# What it does, in order:
#   1. checks the hostfile (python -m ofa_ds.cluster.launch_setup hosts);
#   2. picks the network interface that reaches the master (--ifname, default: `ip route get MASTER`) and writes
#      the env file DeepSpeed exports on every node (PATH, PYTHONPATH, NCCL_*/GLOO_*/TORCH_*/OFA_*/HF_* set here,
#      NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_DISABLE with --no-ib) to runs/multinode/*.deepspeed_env and
#      points DS_ENV_FILE at it (nothing is written to ~ or the working directory);
#   3. picks the DeepSpeed config: --ds-config, or ds_configs/ for --zero N in bf16 (A100/H100/H200), fp16
#      (V100/T4: no bf16) or fp32 (no GPU: the CPU config), from nvidia-smi on this node; passed to SCRIPT as
#      `--ds-config FILE` unless SCRIPT ARGS already name one (or --no-config);
#   4. runs launch/doctor.py (pdsh/openmpi; --skip-doctor to skip) and stops if it finds a problem; it replaces
#      DeepSpeed's own ssh check, which ignores PDSH_SSH_ARGS_APPEND;
#   5. runs `python -m deepspeed.launcher.runner ...` (the `deepspeed` command, without relying on its shebang).
#
# Options:
#   --hostfile FILE      default $OFA_HOSTFILE or launch/hostfile
#   --launcher L         pdsh | openmpi | no_ssh
#   --node-rank N        no_ssh only; default $SLURM_NODEID, then $NODE_RANK
#   --master-addr A      default $MASTER_ADDR, then the first host of the hostfile
#   --master-port P      default $MASTER_PORT, then 29500
#   --ifname IF          socket interface for NCCL and gloo on every node (must exist on every node)
#   --no-ib              NCCL_IB_DISABLE=1 (Ethernet only; for IB keep it unset and set NCCL_IB_HCA yourself)
#   --zero N             ZeRO stage for the config pick (default 2)
#   --precision P        auto | bf16 | fp16 | fp32 (default auto)
#   --offload, --nvme    pick the CPU-offload / NVMe-offload variant of the config
#   --ds-config FILE     use this config (no pick)
#   --no-config          do not add --ds-config to SCRIPT ARGS (for scripts that build their own)
#   --env-file FILE      where to write the exported environment
#                        (default runs/multinode/<time>-<host>-<pid>.deepspeed_env)
#   --set KEY=VALUE      one more variable for every node (repeat)
#   --ssh-port P         ssh port for pdsh/doctor (extra ssh options: PDSH_SSH_ARGS_APPEND, as pdsh uses it)
#   --data PATH          also let the doctor check PATH is readable on every node (repeat)
#   --skip-doctor        do not run the doctor first
#   --dry-run            print the env file and the command, run nothing
# Environment: PYTHON (interpreter, default: python on PATH), PDSH_SSH_ARGS_APPEND, NCCL_DEBUG (e.g. INFO).
set -euo pipefail

if [[ "${1:-}" == --as-mpi-rank ]]; then
  # Internal: how each OpenMPI rank starts. Map Open MPI's rank variables to torch's, so that DeepSpeed uses
  # MASTER_ADDR/MASTER_PORT from the env file instead of guessing them with mpi4py and `hostname -I`.
  shift
  export RANK="${OMPI_COMM_WORLD_RANK:?--as-mpi-rank is for processes started by mpirun}"
  export WORLD_SIZE="$OMPI_COMM_WORLD_SIZE" LOCAL_RANK="$OMPI_COMM_WORLD_LOCAL_RANK"
  export LOCAL_WORLD_SIZE="${OMPI_COMM_WORLD_LOCAL_SIZE:-1}"
  exec "$@"
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"  # the real interpreter, not a pyenv/conda shim
HOSTFILE="${OFA_HOSTFILE:-launch/hostfile}"
LAUNCHER=pdsh
NODE_RANK="${SLURM_NODEID:-${NODE_RANK:-}}"
MASTER_ADDR_ARG="${MASTER_ADDR:-}"
MASTER_PORT_ARG="${MASTER_PORT:-29500}"
IFNAME=""
NO_IB=0
ZERO=2
PRECISION=auto
OFFLOAD=""
DS_CONFIG=""
NO_CONFIG=0
ENV_FILE=""
SSH_PORT=""
SKIP_DOCTOR=0
DRY_RUN=0
EXTRA_SET=()
DOCTOR_DATA=()

die() { echo "multinode.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostfile) need "$@"; HOSTFILE="$2"; shift 2 ;;
    --launcher) need "$@"; LAUNCHER="$2"; shift 2 ;;
    --node-rank) need "$@"; NODE_RANK="$2"; shift 2 ;;
    --master-addr) need "$@"; MASTER_ADDR_ARG="$2"; shift 2 ;;
    --master-port) need "$@"; MASTER_PORT_ARG="$2"; shift 2 ;;
    --ifname) need "$@"; IFNAME="$2"; shift 2 ;;
    --no-ib) NO_IB=1; shift ;;
    --zero) need "$@"; ZERO="$2"; shift 2 ;;
    --precision) need "$@"; PRECISION="$2"; shift 2 ;;
    --offload) OFFLOAD="--offload offload"; shift ;;
    --nvme) OFFLOAD="--offload nvme"; shift ;;
    --ds-config) need "$@"; DS_CONFIG="$2"; shift 2 ;;
    --no-config) NO_CONFIG=1; shift ;;
    --env-file) need "$@"; ENV_FILE="$2"; shift 2 ;;
    --set) need "$@"; EXTRA_SET+=("--set" "$2"); shift 2 ;;
    --ssh-port) need "$@"; SSH_PORT="$2"; shift 2 ;;
    --data) need "$@"; DOCTOR_DATA+=("--data" "$2"); shift 2 ;;
    --skip-doctor) SKIP_DOCTOR=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "no script given: launch/multinode.sh [options] -- launch/pretrain.py [args]"
SCRIPT="$1"; shift
SCRIPT_ARGS=("$@")
case "$LAUNCHER" in pdsh|openmpi|no_ssh) ;; *) die "--launcher must be pdsh, openmpi or no_ssh" ;; esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# 1. hostfile
HOSTS="$("$PYTHON" -m ofa_ds.cluster.launch_setup hosts "$HOSTFILE")" \
  || die "fix the hostfile $HOSTFILE (problems above)"
FIRST_HOST="$(head -n1 <<<"$HOSTS" | cut -d' ' -f1)"
NUM_NODES="$(wc -l <<<"$HOSTS")"
MASTER="${MASTER_ADDR_ARG:-$FIRST_HOST}"
if [[ "$LAUNCHER" == no_ssh ]]; then
  [[ -n "$NODE_RANK" ]] || die "--launcher no_ssh needs --node-rank (0..$((NUM_NODES - 1))) or SLURM_NODEID"
  (( NODE_RANK >= 0 && NODE_RANK < NUM_NODES )) || die "--node-rank $NODE_RANK is outside 0..$((NUM_NODES - 1))"
fi

# 2. interface + env file
if [[ -z "$IFNAME" ]]; then
  # the interface towards the master, or (when the master is this node and its name resolves to 127.0.1.1)
  # towards the other hosts; loopback never carries traffic between nodes
  # shellcheck disable=SC2046
  IFNAME="$("$PYTHON" -m ofa_ds.cluster.launch_setup ifname "$MASTER" $(cut -d' ' -f1 <<<"$HOSTS") 2>/dev/null || true)"
fi
if [[ -z "$ENV_FILE" ]]; then
  mkdir -p "$REPO/runs/multinode"
  ENV_FILE="$REPO/runs/multinode/$(date +%Y%m%d-%H%M%S)-$(hostname -s 2>/dev/null || echo node)-$$.deepspeed_env"
fi
(( NO_IB )) && EXTRA_SET+=("--set" "NCCL_IB_DISABLE=1")
[[ "$LAUNCHER" == openmpi ]] && EXTRA_SET+=("--set" "MASTER_ADDR=$MASTER" "--set" "MASTER_PORT=$MASTER_PORT_ARG")
"$PYTHON" -m ofa_ds.cluster.launch_setup env-file "$ENV_FILE" --repo "$REPO" ${IFNAME:+--ifname "$IFNAME"} \
  ${EXTRA_SET[@]+"${EXTRA_SET[@]}"} >/dev/null
ENV_FILE="$(cd "$(dirname "$ENV_FILE")" && pwd)/$(basename "$ENV_FILE")"
export DS_ENV_FILE="$ENV_FILE"

# 3. DeepSpeed config
if (( ! NO_CONFIG )); then
  HAS_CFG=0
  PREV=""
  for a in ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"}; do  # the script's own --ds-config wins (and goes to the doctor)
    [[ "$PREV" == --ds-config ]] && { HAS_CFG=1; DS_CONFIG="$a"; }
    [[ "$a" == --ds-config=* ]] && { HAS_CFG=1; DS_CONFIG="${a#--ds-config=}"; }
    PREV="$a"
  done
  if (( ! HAS_CFG )); then
    if [[ -z "$DS_CONFIG" ]]; then
      DS_CONFIG="$("$PYTHON" -m ofa_ds.cluster.launch_setup pick-config --zero "$ZERO" --precision "$PRECISION" \
                   --dir "$REPO/ds_configs" $OFFLOAD)" || die "no DeepSpeed config picked (message above)"
    fi
    SCRIPT_ARGS+=("--ds-config" "$DS_CONFIG")
  fi
fi

# 4. doctor
if (( ! SKIP_DOCTOR && ! DRY_RUN )) && [[ "$LAUNCHER" != no_ssh ]]; then
  DOC_ARGS=(--hostfile "$HOSTFILE" --master-addr "$MASTER" --master-port "$MASTER_PORT_ARG" --launcher "$LAUNCHER"
            --env-file "$ENV_FILE")
  [[ -n "$SSH_PORT" ]] && DOC_ARGS+=(--ssh-port "$SSH_PORT")
  [[ -n "$DS_CONFIG" ]] && DOC_ARGS+=(--ds-config "$DS_CONFIG")
  "$PYTHON" "$REPO/launch/doctor.py" "${DOC_ARGS[@]}" ${DOCTOR_DATA[@]+"${DOCTOR_DATA[@]}"} \
    || die "the doctor found problems (above); fix them or pass --skip-doctor"
fi

# 5. launch
CMD=("$PYTHON" -u -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER"
     --master_port "$MASTER_PORT_ARG")
[[ -n "$SSH_PORT" ]] && CMD+=(--ssh_port "$SSH_PORT")
case "$LAUNCHER" in
  pdsh)
    CMD+=(--launcher pdsh)
    (( SKIP_DOCTOR )) || CMD+=(--no_ssh_check)  # the doctor checked ssh with the options pdsh uses
    ;;
  openmpi)
    # DeepSpeed defaults to `--mca btl_tcp_if_include eth0`; use the interface that reaches the master instead.
    MPI_ARGS=""
    [[ -n "$IFNAME" ]] && MPI_ARGS+="--mca btl_tcp_if_include $IFNAME --mca oob_tcp_if_include $IFNAME"
    [[ "$(id -u)" == 0 ]] && MPI_ARGS+=" --allow-run-as-root"
    RSH_ARGS="${PDSH_SSH_ARGS_APPEND:-}${SSH_PORT:+ -p $SSH_PORT}"
    [[ -n "${RSH_ARGS// }" ]] && export OMPI_MCA_plm_rsh_args="$RSH_ARGS"
    (( SKIP_DOCTOR )) || CMD+=(--no_ssh_check)
    CMD+=(--launcher openmpi --launcher_args "$MPI_ARGS" --no_python "$HERE/multinode.sh" --as-mpi-rank "$PYTHON" -u)
    ;;
  no_ssh)
    CMD+=(--no_ssh --node_rank "$NODE_RANK")
    # DeepSpeed reads the env file only when it ssh-es; here this node is the only one we start, so export it.
    while IFS= read -r line; do [[ "$line" == *=* ]] && export "${line%%=*}=${line#*=}"; done <"$ENV_FILE"
    ;;
esac
CMD+=("$SCRIPT" ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"})

RANK_NOTE=""
[[ "$LAUNCHER" == no_ssh ]] && RANK_NOTE=" (node rank $NODE_RANK)"
echo "multinode.sh: $NUM_NODES node(s) from $HOSTFILE, launcher $LAUNCHER$RANK_NOTE," \
     "master $MASTER:$MASTER_PORT_ARG, interface ${IFNAME:-unset}, env file $ENV_FILE" >&2
if (( DRY_RUN )); then
  echo "--- $ENV_FILE"; cat "$ENV_FILE"; echo "--- command"; printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
