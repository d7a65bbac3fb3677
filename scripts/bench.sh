#!/usr/bin/env bash
# `make bench`: boot the built-in guest and print kvmaccess's speed table next to the paper's.
set -euo pipefail
cd "$(dirname "$0")/.."
accel=${1:-auto}
kva=${KVMACCESS_BIN:-target/release/kvmaccess}
export KVMACCESS_RUN_DIR=${KVMACCESS_RUN_DIR:-$PWD/.cache/run}
name=bench
cleanup() { "$kva" --guest "$name" shutdown >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
"$kva" --guest "$name" boot --accel "$accel" --smp 2 >/dev/null
"$kva" --guest "$name" bench "${@:2}"
echo
"$kva" --guest "$name" bench monitor
