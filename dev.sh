#!/usr/bin/env bash
# One entry point for a new machine: installs what compatfs needs (Debian
# packages, a virtual environment with the package), then runs it.
#
#   ./dev.sh demo            build a demo legacy /persist tree and run compatfs on it
#   ./dev.sh test [ARGS...]  run the whole test suite (extra ARGS go to pytest)
#   ./dev.sh setup           only install
#   ./dev.sh container-setup install what mountscripts/compatfs-ci-container
#                            needs (mmdebstrap; podman and runc if no engine runs)
#   ./dev.sh packages        print the Debian packages the suite needs
#
# Safe to run again: each step is skipped when already done.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
venv="$here/.venv"

# fuse3 + libfuse3-dev + pkg-config + gcc + python3-dev: build and mount pyfuse3.
# qemu-utils: real qcow2 images. e2fsprogs + util-linux: loop-mounted ext4
# vaults with fscrypt. fuse-overlayfs: the reference FUSE peer in bench/.
# The shellcheck package lints mountscripts/, busybox runs them as EVE ash would.
# mount (mount, umount, losetup), ca-certificates (pip over https) and tzdata (the
# log tests' time zones) are on every ordinary Debian machine, not in a minimal
# root file system such as a container's.
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
          qemu-utils e2fsprogs util-linux fuse-overlayfs shellcheck busybox
          mount ca-certificates tzdata)

# mountscripts/compatfs-ci-container: mmdebstrap builds its image from Debian
# packages (the archive keyring verifies them, also on Ubuntu); podman runs it
# when neither podman nor docker runs containers here yet. Debian 12's podman
# prefers crun; runc is what works on a hybrid cgroup layout (docs/ci.md).
container_build_packages=(mmdebstrap debian-archive-keyring)
container_engine_packages=(podman runc uidmap)

say() { printf 'dev.sh: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else say "need root to run: $*"; exit 1
    fi
}

install_system_packages() {
    local missing=()
    [ $# -gt 0 ] || set -- "${packages[@]}"
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_python_env() {
    local stamp="$venv/.compatfs-installed"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the virtual environment in .venv"
        python3 -m venv "$venv"
    fi
    say "installing compatfs and its test dependencies into .venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
}

setup() {
    install_system_packages
    install_python_env
}

# An engine that answers 'info' runs containers (a docker client without a
# daemon does not).
engine_runs() {
    local e
    for e in podman docker; do
        command -v "$e" >/dev/null 2>&1 && "$e" info >/dev/null 2>&1 && return 0
    done
    return 1
}

container_setup() {
    if ! command -v apt-get >/dev/null 2>&1; then
        say "not a Debian-like system (no apt-get): install mmdebstrap and podman or docker yourself"
        exit 1
    fi
    install_system_packages "${container_build_packages[@]}"
    engine_runs || install_system_packages "${container_engine_packages[@]}"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    container-setup) container_setup ;;
    packages) printf '%s\n' "${packages[@]}" ;;
    demo) setup; exec "$venv/bin/compatfs" demo "$@" ;;
    test) setup; exec "$venv/bin/python" -m pytest "$@" ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
