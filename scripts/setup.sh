#!/usr/bin/env bash
# Makes sure this machine has what Godwit builds and runs with: a Rust toolchain (rustup),
# gcc + binutils (the built-in guests are compiled from C at build time), and usable KVM.
# Installs missing Debian packages when run as root. Safe to run repeatedly.
set -euo pipefail

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc)
command -v objcopy >/dev/null || need_apt+=(binutils)
command -v curl >/dev/null || need_apt+=(curl)
command -v qemu-nbd >/dev/null || need_apt+=(qemu-utils)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "setup: installing ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: missing ${need_apt[*]}; install them (as root: apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null; then
    echo "setup: cargo is missing; install Rust with rustup (https://rustup.rs)" >&2
    exit 1
fi
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "setup: warning: /dev/kvm is not usable by $(id -un); VMs cannot run here" >&2
fi
