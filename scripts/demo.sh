#!/usr/bin/env bash
# `make demo`: boot the built-in guest, attach from outside, and show what kvmaccess sees.
set -euo pipefail
cd "$(dirname "$0")/.."
accel=${1:-auto}
kva=${KVMACCESS_BIN:-target/release/kvmaccess}
export KVMACCESS_RUN_DIR=${KVMACCESS_RUN_DIR:-$PWD/.cache/run}
name=demo

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ kvmaccess %s\n' "$*"; "$kva" --guest "$name" "$@"; }

cleanup() { "$kva" --guest "$name" shutdown >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

say "Boot the built-in Debian guest with shared RAM and a QMP socket"
run boot --accel "$accel" --smp 2

say "vCPU registers, control registers decoded"
run regs --all

say "GDT of vCPU 0"
run gdt

say "The 256 IDT gates of vCPU 0, handlers resolved to kernel symbols"
run idt

say "Zero configuration: the kernel profile found in guest memory alone"
run info

say "Processes, modules and the system-call table, from outside"
run ps | head -n 8
run lsmod
run syscalls | head -n 6

say "The kernel banner, read through a guest-virtual address"
banner=$("$kva" --guest "$name" --json symbols linux_banner | sed -n 's/.*"address": "0x\([0-9a-f]*\)".*/\1/p' | head -n1)
run translate "0x$banner"
run read "0x$banner" 160

say "A consistent snapshot: pause, dump, resume; then the same read from the file"
core=$KVMACCESS_RUN_DIR/$name.core
rm -f "$core"
run pause
run dump -o "$core" --quiet
run resume
printf '$ kvmaccess --dump %s read 0x%s 64\n' "$core" "$banner"
"$kva" --dump "$core" read "0x$banner" 64
rm -f "$core"

say "The integrity monitor: baseline the clean guest, then watch it"
base=$KVMACCESS_RUN_DIR/$name-baseline.json
rm -f "$base" "$base.bin"
run baseline -o "$base"
log=$KVMACCESS_RUN_DIR/$name-watch.log
rm -f "$log"
"$kva" --guest "$name" watch --baseline "$base" --interval 1s --no-info --log "$log" > /dev/null &
watcher=$!
sleep 3

say "Inside the guest, a rootkit module hooks the syscall table, an IDT gate and the GDT, clears CR0.WP and hides itself"
"$kva" --guest "$name" console "insmod /lib/modules/kvma_attack.ko attack=syscall,idt,gdt,wp,hide"
sleep 4
# Forking with CR0.WP clear corrupts copy-on-write pages, so WP comes back before the module's
# log is shown.
"$kva" --guest "$name" console "echo wp > /sys/module/kvma_attack/parameters/undo; dmesg | grep 'kvma_attack:.*done' | cut -c1-150"
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true

say "What the watch reported (one JSON line per finding, also in $log)"
python3 - "$log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("event") == "finding":
        owner = f" (owner: {e['owner']})" if e.get("owner") else ""
        print(f"[{e['severity']}] {e['check']}: {e['object']} {e['entry']} -> {e['actual']}{owner}")
        print(f"    {e['explanation']}")
PY

say "Done: the guest is shut down on exit"
