#!/usr/bin/env bash
# Builds the emulated ARM board: an arm64 Debian bookworm chroot run by qemu-user, with a venv of
# the agent's runtimes (numpy, onnxruntime, ai-edge-litert, grpcio, protobuf) from PyPI's aarch64
# wheels; then checks that Python in it is aarch64 and that onnxruntime runs a small model.
#
#   sudo bash tests/arm/chroot.sh          # EDGEFORGE_ARM_ROOTFS=DIR to build elsewhere
#
# Idempotent: finished phases are stamped and skipped. From scratch 12-21 min on 2 shared cores
# (debootstrap 40 s, second stage 9-17 min, pip 2-4 min); then ~10 s for the check. Each phase's
# time goes to the log and to .edgeforge-arm/timings.log.
# Mounts are taken down on exit; after a killed run, tests/arm/umount.sh does it.
set -euo pipefail
source "$(dirname "$0")/rootfs.sh"

lock_rootfs
trap umount_rootfs EXIT
timed build-rootfs build_rootfs

check_rootfs() {
    local python=$REPO_ROOT/.venv/bin/python
    [[ -x $python ]] || die "$python is missing: run make setup (it builds the smoke model with onnx)"
    rm -rf "$ROOTFS/tmp/edgeforge-smoke"
    "$python" "$ARM_DIR/smoke.py" write "$ROOTFS/tmp/edgeforge-smoke"
    cp "$ARM_DIR/smoke.py" "$ROOTFS/tmp/edgeforge-smoke/"
    local machine
    machine=$(in_chroot python -c 'import platform; print(platform.machine())')
    [[ $machine == aarch64 ]] || die "python in the chroot reports $machine, not aarch64"
    in_chroot python /tmp/edgeforge-smoke/smoke.py check /tmp/edgeforge-smoke
}
timed check-rootfs check_rootfs
