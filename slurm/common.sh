# Shared by the sbatch scripts in slurm/ (sourced, not run): the job's nodes, the first node's
# address, Ray start/wait, the trainer ranks' nodes, the recipe step and the cleanup at the end.
#
# A script sources it from the checkout (sbatch runs a copy of the script, so its own directory
# is not the checkout's), calls grpo_setup with its usage line, allowed recipes and arguments,
# then starts its steps and runs the recipe with grpo_run_recipe. Every step is a background
# `srun --overlap` on one node; when the recipe ends (or the job is told to stop) the EXIT trap
# stops the recipe first (so its last checkpoint completes with all ranks), then every other step.
# A step is stopped with SIGINT to its `srun -X`, which passes it on to the step's processes: the
# recipe takes it as a stop (it checkpoints), any other step's wrapper turns it into SIGTERM for
# its command and then exits 0, so the job's log ends with the recipe's summary. SIGTERM to srun
# would kill the step instead ("srun: error: nodeN: task 0: Killed").
#
# The run directory defaults to outputs/<job name>-<job id> (the same for every start of the
# job), and a requeued job (SLURM_RESTART_COUNT > 0: `scontrol requeue`, preemption, a node
# failure) resumes from its latest checkpoint (resume=true) unless the overrides say otherwise.
#
# Environment (all optional):
#   GRPO_REPO             checkout to run (default: $SLURM_SUBMIT_DIR, where sbatch was called)
#   GRPO_PYTHON           its environment's python (default: $GRPO_REPO/.venv/bin/python)
#   GRPO_GPUS_PER_NODE    GPUs per node (default: `nvidia-smi -L` on the first node); 0: one CPU
#                         rank per node and device=cpu
#   GRPO_HEAD_IP          the first node's address as the others reach it (default: the first
#                         address of `hostname -I` there)
#   GRPO_RENDEZVOUS_PORT  trainer ranks' rendezvous port on the first node (default 29511)
#   GRPO_RAY_PORT         Ray head port on the first node (default 6379)
#   GRPO_RAY_WAIT_S       how long to wait for every Ray node to join (default 180)
#   GRPO_STOP_GRACE_S     how long each step may take to stop at the end before SIGKILL (default 60)
#   RAY_AUTH_MODE         token (default: ~/.ray/auth_token, generated once, on a shared home) | disabled

grpo_fail() {  # one line on stderr, exit status 2 (a bad invocation or job shape)
    echo "$*" >&2
    exit 2
}

# grpo_setup USAGE RECIPES ARGS...: check the invocation and the job, set the variables below.
# RECIPES: the recipe file names this script runs, space separated. Sets RECIPE, OVERRIDES (the
# user's Hydra overrides), REPO, PYTHON, RAY, GPUS_PER_NODE, CPUS_PER_NODE, DEVICE, RANKS_PER_NODE,
# NODES (host names), NUM_NODES, HEAD (the first node: this script's), RUN_DEFAULTS (the run
# directory, and resume=true in a requeued job: defaults for grpo_recipe_args). HEAD_IP, the first
# node's address, is set by grpo_start_trainer_nodes and grpo_start_ray.
grpo_setup() {
    local usage="$1" recipes="$2"
    shift 2
    [[ $# -ge 1 ]] || grpo_fail "$usage"
    RECIPE="$1"
    OVERRIDES=("${@:2}")
    REPO="${GRPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
    [[ " $recipes " == *" $RECIPE "* ]] || grpo_fail "unknown recipe $RECIPE: this script runs $recipes"
    [[ -f "$REPO/sota-implementations/grpo/$RECIPE" ]] || grpo_fail "no recipe $RECIPE in $REPO (set GRPO_REPO)"
    PYTHON="${GRPO_PYTHON:-$REPO/.venv/bin/python}"
    [[ -x "$PYTHON" ]] || grpo_fail "no python at $PYTHON (set GRPO_PYTHON)"
    RAY="$(dirname "$PYTHON")/ray"
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || grpo_fail "SLURM_JOB_NODELIST is not set: submit with sbatch ($usage)"
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    NUM_NODES=${#NODES[@]}
    (( NUM_NODES >= 1 )) || grpo_fail "no nodes in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    HEAD="${NODES[0]}"

    # `|| true`: no nvidia-smi (a CPU node) is 0 GPUs, not a failed pipeline under `set -o pipefail`.
    GPUS_PER_NODE="${GRPO_GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}"
    CPUS_PER_NODE="${SLURM_CPUS_ON_NODE:-$(nproc)}"
    DEVICE=cpu RANKS_PER_NODE=1
    if (( GPUS_PER_NODE > 0 )); then DEVICE=cuda RANKS_PER_NODE=$GPUS_PER_NODE; fi

    # The checkout runs from source, whatever the environment has installed.
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
    cd "$REPO"
    STEP_PIDS=() STEP_NAMES=() RECIPE_PID="" RECIPE_ENV=() SIGNALLED=""
    RUN_DEFAULTS=("hydra.run.dir=outputs/${SLURM_JOB_NAME:-grpo}-${SLURM_JOB_ID:-0}")
    if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
        RUN_DEFAULTS+=(resume=true)
        echo "requeued (start $(( SLURM_RESTART_COUNT + 1 )) of job $SLURM_JOB_ID): resuming from the run's latest checkpoint"
    fi
    trap grpo_cleanup EXIT
    trap 'grpo_signal TERM' TERM
    trap 'grpo_signal INT' INT
    HEAD_IP=""
}

grpo_head_ip() {  # sets HEAD_IP once (a job step: after the script's own checks, which start none)
    [[ -z "$HEAD_IP" ]] || return 0
    HEAD_IP="${GRPO_HEAD_IP:-$(grpo_on "$HEAD" hostname -I | awk '{print $1}' || true)}"
    [[ -n "$HEAD_IP" ]] || grpo_fail "no address for $HEAD from hostname -I (set GRPO_HEAD_IP)"
}

grpo_on() {  # grpo_on NODE CMD...: CMD as a job step on NODE with all of its CPUs (foreground)
    local node="$1"
    shift
    srun --overlap --nodes=1 --ntasks=1 --cpus-per-task="$CPUS_PER_NODE" -w "$node" "$@"
}

# A step's command runs under this wrapper (bash -c): in the background, so it ignores the SIGINT
# that stops the step (so does everything it starts: Ray's processes); the wrapper gets it (or the
# SIGTERM of scancel and `scontrol requeue`), sends the command SIGTERM (`ray start --block` then
# stops its node's Ray processes, a joined rank leaves it to rank 0) and, once the command has
# ended, exits 0: it was told to stop, it did not fail.
GRPO_STOPPABLE='stop=0
trap "stop=1; kill -TERM \$pid 2>/dev/null" INT TERM
"$@" &
pid=$!
while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
done
(( stop )) && exit 0
exit "$rc"'

grpo_step() {  # grpo_step NAME NODE CMD...: CMD as a background job step on NODE, stopped at the end
    local name="$1" node="$2"
    shift 2
    # srun itself in the background (not a function in a subshell), so that $! is srun's pid and a
    # signal to it reaches the step.
    srun --overlap -X --quiet --nodes=1 --ntasks=1 --cpus-per-task="$CPUS_PER_NODE" -w "$node" \
        bash -c "$GRPO_STOPPABLE" grpo-step "$@" &
    STEP_PIDS+=("$!")
    STEP_NAMES+=("$name on $node")
}

# grpo_start_trainer_nodes T: nodes 1..T-1 join the trainer ranks of the recipe (rank 0, on the
# first node). Each waits for the recipe's rendezvous, so they may start first. Sets
# TRAINER_DEFAULTS (device, ranks: the user's overrides may set these) and TRAINER_OVERRIDES (the
# job's shape: nodes and rendezvous).
grpo_start_trainer_nodes() {
    local nodes="$1" i rendezvous
    grpo_head_ip
    rendezvous="$HEAD_IP:${GRPO_RENDEZVOUS_PORT:-29511}"
    for (( i = 1; i < nodes; i++ )); do
        grpo_step "trainer ranks (node rank $i)" "${NODES[$i]}" \
            "$PYTHON" -m grpo_utils.distributed.join --address "$rendezvous" --node-rank "$i"
    done
    TRAINER_DEFAULTS=("device=$DEVICE" "train_model.num_devices=$(( nodes * RANKS_PER_NODE ))")
    TRAINER_OVERRIDES=("train_model.num_nodes=$nodes" "train_model.rendezvous=$rendezvous")
    echo "trainer: ${nodes} node(s) x ${RANKS_PER_NODE} rank(s) on $DEVICE (${NODES[*]:0:nodes}), rendezvous $rendezvous"
}

# grpo_start_ray HEAD_GPUS HEAD_CPUS HEAD_VISIBLE_GPUS WORKER_NODES...: the Ray head on the first
# node offering HEAD_GPUS GPUs (those in HEAD_VISIBLE_GPUS, a CUDA_VISIBLE_DEVICES list) and
# HEAD_CPUS CPUs, a Ray worker with all of its GPUs and CPUs on each of WORKER_NODES; returns
# once all have joined. Sets RAY_ADDRESS.
grpo_start_ray() {
    local head_gpus="$1" head_cpus="$2" head_visible="$3"
    shift 3
    local node
    grpo_head_ip
    RAY_ADDRESS="$HEAD_IP:${GRPO_RAY_PORT:-6379}"
    # A Ray node stopped at the end has nothing to drain (the recipe has finished): no 30 s wait.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
    # Token authentication: every node and the recipe read the token from ~/.ray/auth_token.
    export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
    if [[ "$RAY_AUTH_MODE" == token ]]; then "$RAY" get-auth-token --generate >/dev/null; fi
    grpo_step "Ray head" "$HEAD" env CUDA_VISIBLE_DEVICES="$head_visible" "$RAY" start --head \
        --node-ip-address="$HEAD_IP" --port="${RAY_ADDRESS##*:}" --num-gpus="$head_gpus" --num-cpus="$head_cpus" \
        --include-dashboard=false --disable-usage-stats --block
    grpo_wait_ray 1  # the workers then find a head to join (instead of a fixed sleep)
    for node in "$@"; do
        grpo_step "Ray worker" "$node" "$RAY" start --address="$RAY_ADDRESS" --num-gpus="$GPUS_PER_NODE" \
            --num-cpus="$CPUS_PER_NODE" --disable-usage-stats --block
    done
    grpo_wait_ray $(( 1 + $# ))
    echo "Ray: head on $HEAD ($RAY_ADDRESS, $head_gpus GPU(s), $head_cpus CPU(s)), workers on: ${*:-none}${*:+ ($GPUS_PER_NODE GPU(s), $CPUS_PER_NODE CPU(s) each)}"
}

grpo_wait_ray() {  # grpo_wait_ray N: until N Ray nodes are alive at RAY_ADDRESS (exit 1 after GRPO_RAY_WAIT_S)
    "$PYTHON" - "$RAY_ADDRESS" "$1" "${GRPO_RAY_WAIT_S:-180}" <<'EOF' || exit 1
import sys
import time

import ray

address, want, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, alive, error = time.monotonic() + wait_s, 0, ""
while time.monotonic() < deadline:
    try:
        if not ray.is_initialized():
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        alive = sum(node["Alive"] for node in ray.nodes())
        if alive >= want:
            sys.exit(0)
    except (ConnectionError, RuntimeError) as e:  # the head is not up yet
        error = f" ({str(e).strip().splitlines()[0]})" if str(e).strip() else ""
    time.sleep(1)
sys.exit(f"Ray cluster at {address}: {alive} of {want} nodes joined within {wait_s:g}s{error}")
EOF
}

# grpo_recipe_args DEFAULTS -- OVERRIDES: sets RECIPE_ARGS: the user's arguments, then each of
# DEFAULTS (KEY=VALUE) whose key they do not set, then OVERRIDES (the job's own; these win). One
# list in this order because Hydra's flags (--config-name X) must not follow an override.
grpo_recipe_args() {
    local arg given
    RECIPE_ARGS=("${OVERRIDES[@]}")
    while [[ $# -gt 0 && "$1" != -- ]]; do
        given=0
        for arg in "${OVERRIDES[@]}"; do
            [[ "${arg#"${arg%%[!+~]*}"}" == "${1%%=*}="* ]] && given=1
        done
        (( given )) || RECIPE_ARGS+=("$1")
        shift
    done
    RECIPE_ARGS+=("${@:2}")
}

# grpo_run_recipe ARGS...: the recipe as a step on the first node (this process's rank 0) with
# ARGS, in the environment RECIPE_ENV (VAR=VALUE items, may be empty); returns its exit status.
# A SIGTERM/SIGINT to this script alone (`scancel --batch --signal=TERM`, `sbatch --signal=B:TERM@T`)
# is passed on to the recipe as SIGINT (`srun -X` forwards it), which it takes like SIGTERM: it
# checkpoints and exits with its own status; one still running GRPO_STOP_GRACE_S later is killed.
# (scancel and `scontrol requeue` SIGTERM every step's processes themselves: see grpo_signal.)
grpo_run_recipe() {
    local rc grace="${GRPO_STOP_GRACE_S:-60}"
    srun --overlap -X --quiet --nodes=1 --ntasks=1 --cpus-per-task="$CPUS_PER_NODE" -w "$HEAD" \
        env "${RECIPE_ENV[@]}" "$PYTHON" "sota-implementations/grpo/$RECIPE" "$@" &
    RECIPE_PID=$!
    while :; do
        wait "$RECIPE_PID" && rc=0 || rc=$?
        kill -0 "$RECIPE_PID" 2>/dev/null || break  # else: a trapped signal interrupted the wait
        if [[ -n "$SIGNALLED" ]] && ! grpo_wait_gone "$RECIPE_PID" "$grace"; then
            echo "the recipe did not stop within ${grace}s of SIG$SIGNALLED: killed" >&2
            kill -KILL "$RECIPE_PID" 2>/dev/null || true
        fi
    done
    RECIPE_PID=""
    return "$rc"
}

# A signal to the script: to the recipe if it runs (it stops the run), else exit. Not when SLURM is
# ending the job (scancel, `scontrol requeue`, the time limit: the job is no longer RUNNING): it
# signals every step itself, and the recipe would take a second signal as "stop now", without
# its checkpoint.
grpo_signal() {
    SIGNALLED="$1"
    if [[ -n "$RECIPE_PID" ]]; then
        local state
        state="$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null || true)"
        [[ -z "$state" || "$state" == RUNNING ]] || return 0
        kill -INT "$RECIPE_PID" 2>/dev/null || true
    else
        exit $(( 128 + $(kill -l "$1") ))
    fi
}

grpo_wait_gone() {  # grpo_wait_gone PID SECONDS: true once PID is gone, false if it outlives SECONDS
    local left="$2"
    while kill -0 "$1" 2>/dev/null; do
        (( left-- > 0 )) || return 1
        sleep 1
    done
}

# The EXIT trap: the recipe first (its last checkpoint needs every trainer rank and Ray), then the
# joined ranks and Ray nodes still running, each stopped (SIGINT to its srun: the wrapper above
# SIGTERMs the command; `ray start --block` then stops its node's Ray processes) and SIGKILLed after
# GRPO_STOP_GRACE_S. A Ray node that had to be
# killed gets `ray stop --force` on its node (exclusive nodes: all Ray processes there are this job's).
grpo_cleanup() {
    local grace="${GRPO_STOP_GRACE_S:-60}" i
    trap '' INT TERM
    if [[ -n "${RECIPE_PID:-}" ]]; then
        kill -INT "$RECIPE_PID" 2>/dev/null || true
        grpo_wait_gone "$RECIPE_PID" "$grace" || kill -KILL "$RECIPE_PID" 2>/dev/null || true
    fi
    for i in "${!STEP_PIDS[@]}"; do kill -INT "${STEP_PIDS[$i]}" 2>/dev/null || true; done
    for i in "${!STEP_PIDS[@]}"; do
        grpo_wait_gone "${STEP_PIDS[$i]}" "$grace" && continue
        echo "${STEP_NAMES[$i]} did not stop within ${grace}s: killed" >&2
        kill -KILL "${STEP_PIDS[$i]}" 2>/dev/null || true
        if [[ "${STEP_NAMES[$i]}" == Ray* ]]; then
            grpo_on "${STEP_NAMES[$i]##* on }" "$RAY" stop --force >/dev/null 2>&1 || true
        fi
    done
    wait 2>/dev/null || true
}
