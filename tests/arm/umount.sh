#!/usr/bin/env bash
# Unmounts what chroot.sh or run.sh mounted in the ARM rootfs (they do it on exit; this is for a
# run that was killed). Usage: bash tests/arm/umount.sh
set -euo pipefail
source "$(dirname "$0")/rootfs.sh"
umount_rootfs
if grep -F " $ROOTFS/" /proc/self/mounts; then
    die "still mounted under $ROOTFS"
fi
log "nothing mounted under $ROOTFS"
