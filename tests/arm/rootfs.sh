# The emulated ARM board's root filesystem: functions sourced by chroot.sh, run.sh and umount.sh.
#
# An arm64 Debian bookworm chroot that runs under qemu-user through binfmt_misc. Everything it
# needs from the host is bind-mounted on entry (mount_rootfs) and taken down on exit (umount_rootfs).
# Stamps under $ROOTFS/var/lib/edgeforge-arm/ record finished phases, so they vanish with the rootfs.
#
#   EDGEFORGE_ARM_ROOTFS   where the rootfs lives (default: <repo>/.edgeforge-arm/rootfs, git-ignored)
#   EDGEFORGE_ARM_MIRROR   Debian mirror for debootstrap (default: the host's apt mirror)

ARM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$ARM_DIR/../.." && pwd)
ROOTFS=${EDGEFORGE_ARM_ROOTFS:-$REPO_ROOT/.edgeforge-arm/rootfs}
STAMPS=$ROOTFS/var/lib/edgeforge-arm
GUEST_VENV=/opt/edgeforge/venv             # inside the chroot
SUITE=bookworm                             # python3 is 3.11 there, like the host

log() { printf '[arm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs "$@" and logs how long it took as "timing <name>: N s" (also appended to timings.log).
timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    local took=$((SECONDS - start))
    log "timing $name: ${took} s"
    mkdir -p "$(dirname "$ROOTFS")"
    printf '%s\t%s\t%s\n' "$(date -Is)" "$name" "$took" >> "$(dirname "$ROOTFS")/timings.log"
}

done_stamp() { [[ -f $STAMPS/$1.done ]]; }
stamp() { mkdir -p "$STAMPS" && date -Is > "$STAMPS/$1.done"; }

# One run at a time per rootfs: mounts are not reference counted. A child script inherits the lock.
lock_rootfs() {
    [[ -n ${EDGEFORGE_ARM_LOCKED:-} ]] && return
    mkdir -p "$(dirname "$ROOTFS")"
    exec {ARM_LOCK_FD}>>"$(dirname "$ROOTFS")/lock"
    flock -n "$ARM_LOCK_FD" || die "another run holds $(dirname "$ROOTFS")/lock"
    export EDGEFORGE_ARM_LOCKED=1
}

# The first http(s) Debian mirror in the host's apt sources (deb822 or one-line format).
host_mirror() {
    local mirror
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}')
    [[ -n $mirror ]] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" && $0 ~ /\/debian\/? / {for (i = 2; i <= NF; i++) if ($i ~ /^http/) {print $i; exit}}')
    echo "${mirror:-http://deb.debian.org/debian}"
}

install_host_packages() {
    local missing=()
    for package in qemu-user-static binfmt-support debootstrap; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
    done
    (( ${#missing[@]} == 0 )) && return
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

# binfmt_misc is what makes the kernel hand aarch64 ELF files to qemu. In a container it is often
# not mounted, and binfmt-support's service is not started (no systemd): do both by hand. The proof
# is an aarch64 /bin/true running in the rootfs (whoever registered the handler, under any name).
enable_binfmt() {
    chroot "$ROOTFS" /bin/true 2>/dev/null && return
    local registry=/proc/sys/fs/binfmt_misc
    if [[ ! -f $registry/status ]]; then
        mount -t binfmt_misc binfmt_misc "$registry" \
            || die "cannot mount binfmt_misc on $registry (needs a privileged container, or load it on the host)"
    fi
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
    # Debian registers qemu with flag F (the kernel opens qemu at registration), so the chroot needs
    # no copy of qemu inside it.
    chroot "$ROOTFS" /bin/true || die "aarch64 binaries do not run: $(cat "$registry/qemu-aarch64" 2>&1)"
}

# Mounts /proc, /sys, /dev and the ARM cpuinfo. Each mount is made private or a slave, so nothing
# mounted under the rootfs propagates back to the host's own /proc or /dev.
mount_rootfs() {
    if ! mountpoint -q "$ROOTFS/proc"; then
        mount -t proc proc "$ROOTFS/proc"
        mount --make-private "$ROOTFS/proc"
    fi
    # The trap: qemu-user passes the host's x86 /proc/cpuinfo through; onnxruntime's and LiteRT's
    # cpuinfo parsers find no ARM processor in it and segfault.
    mountpoint -q "$ROOTFS/proc/cpuinfo" || mount --bind "$ARM_DIR/cpuinfo" "$ROOTFS/proc/cpuinfo"
    local target
    for target in sys dev; do
        if ! mountpoint -q "$ROOTFS/$target"; then
            mount --rbind "/$target" "$ROOTFS/$target"
            mount --make-rslave "$ROOTFS/$target"
        fi
    done
    # Name resolution and the host's trusted CAs (some networks intercept TLS) for pip.
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] \
        && cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/edgeforge-host-ca.crt"
    return 0
}

umount_rootfs() {
    local target
    for target in dev sys proc; do
        if mountpoint -q "$ROOTFS/$target"; then
            umount -R "$ROOTFS/$target" 2>/dev/null || umount -R -l "$ROOTFS/$target"
        fi
    done
}

# Runs a command in the chroot with a clean environment (the host's PIP_* and venv must not leak in).
in_chroot() {
    chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TMPDIR=/tmp \
        PATH=$GUEST_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        PIP_CERT=/etc/ssl/certs/edgeforge-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_DEFAULT_TIMEOUT=180 PYTHONDONTWRITEBYTECODE=1 "$@"
}

# The pinned version of each package from the repository's requirements.txt (one source of truth).
pinned() {
    local package
    for package in "$@"; do
        grep -E -i "^${package}==" "$REPO_ROOT/requirements.txt" || die "$package is not pinned in requirements.txt"
    done
}

first_stage() {
    local mirror=${EDGEFORGE_ARM_MIRROR:-$(host_mirror)}
    if [[ -e $ROOTFS ]]; then
        log "removing the unfinished $ROOTFS"
        umount_rootfs
        rm -rf --one-file-system "$ROOTFS"     # never crosses into a mount left behind
    fi
    log "debootstrap --foreign arm64 $SUITE from $mirror"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$ROOTFS" "$mirror" > "$(dirname "$ROOTFS")/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $(dirname "$ROOTFS")/debootstrap.log"
    stamp foreign
}

second_stage() {
    log "debootstrap --second-stage (every package is configured under emulation: minutes)"
    chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >> "$(dirname "$ROOTFS")/debootstrap.log" 2>&1 \
        || die "second stage failed; see $(dirname "$ROOTFS")/debootstrap.log (rm -rf $ROOTFS to start over)"
    stamp second-stage
}

# The agent's runtimes and RPC stack, aarch64 wheels from PyPI, at the host's pinned versions.
guest_packages() {
    log "pip install into $GUEST_VENV (aarch64 wheels; pip itself runs emulated)"
    [[ -x $ROOTFS$GUEST_VENV/bin/python ]] || in_chroot python3 -m venv "$GUEST_VENV"
    # shellcheck disable=SC2046  # one word per pin
    in_chroot pip install -q --only-binary=:all: \
        $(pinned numpy onnxruntime ai-edge-litert grpcio protobuf googleapis-common-protos)
    stamp guest-packages
}

# Builds (or finishes building) the rootfs. Safe to run again: finished phases are skipped.
build_rootfs() {
    [[ $EUID -eq 0 ]] || die "needs root (debootstrap, mount, chroot)"
    install_host_packages
    done_stamp foreign || timed debootstrap-foreign first_stage
    enable_binfmt
    done_stamp second-stage || timed debootstrap-second-stage second_stage
    mount_rootfs
    done_stamp guest-packages || timed pip-install guest_packages
}
