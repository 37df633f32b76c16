#!/usr/bin/env bash
# `make test-arm`: a real build benchmarked by the agent on an emulated arm64 board.
#
#   sudo bash tests/arm/run.sh        # after `make setup agent-wheel`
#
# 1. builds (or reuses) the arm64 Debian chroot under qemu-user (tests/arm/chroot.sh explains it);
# 2. installs the agent wheel from dist/ with its onnxruntime and litert extras into the chroot's venv;
# 3. starts a coordinator on the host's loopback (`edgeforge up --no-agent`) and an agent token;
# 4. starts edgeforge-agent in the chroot (it shares the host's loopback) with the labels
#    emulated=qemu-user and device=arm-board;
# 5. submits tests/arm/spec.yaml (a tiny llama as float32 ONNX and TFLite, target {arch: arm64}) and
#    waits for the report; tests/arm/check_report.py checks the board registered as arm64, was
#    flagged emulated, and measured at least one candidate.
#
# Wall time on 2 shared cores: 6-10 min with the chroot built (the TFLite candidate's emulated 512-token
# passes are most of it), 15-30 min from scratch. Needs root (debootstrap, mount, chroot).
# The timings in the report are meaningless (qemu-user is 10-300x slower than a real board); what the
# run proves is that the agent installs and works on arm64. Logs and the report stay in
# .edgeforge-arm/run/ (coordinator.log, agent.log, report.json). Exit 0 only when every check passed.
set -euo pipefail
source "$(dirname "$0")/rootfs.sh"

WORK=$(dirname "$ROOTFS")
RUN=$WORK/run
MODEL_DIR=$REPO_ROOT/.edgeforge-arm/tiny-llama    # where tests/arm/spec.yaml looks for it
PYTHON=$REPO_ROOT/.venv/bin/python
CLI=("$PYTHON" -m clients.cli.main)
BUILD_TIMEOUT_S=${EDGEFORGE_ARM_BUILD_TIMEOUT_S:-1800}
coordinator_pid='' agent_pid=''

stop_processes() {
    local pid
    for pid in $agent_pid $coordinator_pid; do         # the agent first: it reports to the coordinator
        kill -TERM -- "-$pid" 2>/dev/null || continue  # each runs in its own process group (set -m)
        for _ in {1..20}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
}
cleanup() {
    stop_processes
    umount_rootfs
}

[[ -x $PYTHON ]] || die "$PYTHON is missing: run make setup"
lock_rootfs
trap cleanup EXIT
started=$SECONDS

timed build-rootfs build_rootfs

install_agent() {
    local wheel sha
    # shellcheck disable=SC2012  # the newest by mtime; wheel names are plain
    wheel=$(ls -t "$REPO_ROOT"/dist/edgeforge_agent-*-py3-none-any.whl 2>/dev/null | head -1)
    [[ -n $wheel ]] || die "no dist/edgeforge_agent-*-py3-none-any.whl: run make agent-wheel"
    # The digest of the wheel's RECORD (every file's sha256), not of the zip: a rebuild with the same
    # contents has new timestamps but needs no reinstall.
    sha=$("$PYTHON" -c 'import sys, zipfile, hashlib; z = zipfile.ZipFile(sys.argv[1]); print(hashlib.sha256(
        z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD")))).hexdigest())' "$wheel")
    if [[ $(cat "$STAMPS/agent-wheel.sha256" 2>/dev/null) == "$sha" ]]; then
        log "agent wheel $(basename "$wheel") already installed"
        return
    fi
    log "pip install $(basename "$wheel")[onnxruntime,litert] in the chroot"
    rm -rf "$ROOTFS/tmp/edgeforge-wheel" && mkdir -p "$ROOTFS/tmp/edgeforge-wheel"
    cp "$wheel" "$ROOTFS/tmp/edgeforge-wheel/"
    local guest_wheel
    guest_wheel=/tmp/edgeforge-wheel/$(basename "$wheel")
    # Binary wheels only: an sdist would compile under emulation for an hour rather than fail.
    in_chroot pip install -q --only-binary=:all: "${guest_wheel}[onnxruntime,litert]"
    # Same version, new contents (a rebuilt wheel): replace the package itself, not its dependencies.
    in_chroot pip install -q --no-deps --force-reinstall "$guest_wheel"
    echo "$sha" > "$STAMPS/agent-wheel.sha256"
}
timed agent-wheel install_agent

rm -rf "$RUN" && mkdir -p "$RUN"
"$PYTHON" "$ARM_DIR/tiny_llama.py" "$MODEL_DIR"

set -m                       # background jobs get their own process groups: cleanup stops them whole
cd "$REPO_ROOT"
"${CLI[@]}" up --port 0 --data-dir "$RUN/data" --no-agent > "$RUN/coordinator.out" 2> "$RUN/coordinator.log" &
coordinator_pid=$!
address=''
for _ in {1..120}; do
    address=$(sed -n 's/^edgeforge up: listening on \([^ ]*\).*/\1/p' "$RUN/coordinator.out" | head -1)
    [[ -n $address ]] && break
    kill -0 "$coordinator_pid" 2>/dev/null || { tail -20 "$RUN/coordinator.log" >&2; die "the coordinator exited"; }
    sleep 0.5
done
[[ -n $address ]] || die "the coordinator printed no address in 60 s; see $RUN/coordinator.log"
port=${address##*:}
log "coordinator on 127.0.0.1:$port"
# Authentication is on: every CLI call below uses the admin token the coordinator wrote (0600) before
# it printed its address.
export EDGEFORGE_TOKEN_FILE="$RUN/data/admin.token"

# The token goes to the agent in a file (0600), not on its command line where ps shows it.
umask 077
"${CLI[@]}" --address "127.0.0.1:$port" tokens create --role agent --name arm-board > "$ROOTFS/tmp/arm-board.token"
umask 022
rm -rf "$ROOTFS/tmp/agent"                     # a fresh cache: the artifacts are really fetched
in_chroot edgeforge-agent --coordinator "127.0.0.1:$port" --token-file /tmp/arm-board.token \
    --cache-dir /tmp/agent --label emulated=qemu-user --label device=arm-board > "$RUN/agent.log" 2>&1 &
agent_pid=$!
set +m

wait_for_board() {
    local devices
    for _ in {1..90}; do                       # Python starts slowly under emulation (imports ~10 s)
        devices=$("${CLI[@]}" --address "127.0.0.1:$port" devices --json 2>/dev/null || true)
        grep -q '"arm64"' <<< "$devices" && return
        kill -0 "$agent_pid" 2>/dev/null || { tail -20 "$RUN/agent.log" >&2; die "the agent exited"; }
        sleep 2
    done
    tail -20 "$RUN/agent.log" >&2
    die "no arm64 device registered within 180 s; see $RUN/agent.log"
}
timed agent-registers wait_for_board

build() {
    local status=0
    timeout "$BUILD_TIMEOUT_S" "${CLI[@]}" --address "127.0.0.1:$port" build "$ARM_DIR/spec.yaml" --wait --json \
        > "$RUN/report.json" 2> "$RUN/build.log" || status=$?
    if (( status != 0 )); then
        tail -20 "$RUN/build.log" >&2
        log "agent log tail:"; tail -20 "$RUN/agent.log" >&2
        die "the build exited $status (124: over ${BUILD_TIMEOUT_S} s); see $RUN/"
    fi
}
timed build build
"$PYTHON" "$ARM_DIR/check_report.py" "$RUN/report.json"
log "timing test-arm total: $((SECONDS - started)) s"
log "passed: the agent installs and works on arm64 (the timings above are emulated and meaningless)"
