#!/bin/sh
# Guest-side self-test of the TEST-ONLY kvma_attack module (installed in the test guest as
# /usr/bin/kvma-selftest, the module as /lib/modules/kvma_attack.ko).
#
#   kvma-selftest CASE...   CASE: clean syscall inline idt gdt wp smep ftrace hide hideproc
#                                 hideexit all
#   kvma-selftest           every case in turn
#
# Each case loads the module with one attack, checks from inside the guest that the attack
# happened, unloads it and checks the guest still works. It prints the module's log lines and
# "KVMA-SELFTEST <case> PASS" or "KVMA-SELFTEST <case> FAIL: <why>" (exit status 1).
set -eu
set -o pipefail 2>/dev/null || true

KO=${KVMA_KO:-/lib/modules/kvma_attack.ko}
P=/sys/module/kvma_attack/parameters
case_name=""
mark=0
case_mark=0

fail() {
    echo "KVMA-SELFTEST $case_name FAIL: $*"
    # Leave the guest clean for the next case; WP first, before rmmod forks.
    [ -e "$P/undo" ] && echo wp > "$P/undo" 2>/dev/null
    [ -e "$P/unhide" ] && echo 1 > "$P/unhide" 2>/dev/null
    rmmod kvma_attack 2>/dev/null || true
    exit 1
}

# Kernel log lines written since the last mark_log.
mark_log() { mark=$(dmesg | wc -l); }
new_log() { dmesg | sed -n "$((mark + 1)),\$p"; }
expect_log() {
    new_log | grep -q -- "$1" || { new_log | grep kvma_attack || true; fail "no log line '$1'"; }
}
# Everything the module (or a kernel warning) logged during the current case.
show_log() {
    dmesg | sed -n "$((case_mark + 1)),\$p" | grep -E 'kvma_attack|WARNING|BUG|Oops|Call Trace' || true
}

loaded() { grep -q '^kvma_attack ' /proc/modules; }

load() {
    load_nofork "$@"
    expect_log "kvma_attack: loaded"
}

# With CR0.WP clear the kernel's writes into user memory ignore read-only PTEs, so they land
# in pages that a fork left shared copy-on-write, and the guest's processes corrupt each other
# (the shell segfaulted now and then). So between loading an attack that clears WP and undoing
# it through parameters/undo, the self-test runs shell builtins only: nothing below forks.
load_nofork() {
    loaded && fail "kvma_attack is already loaded"
    mark_log
    rm -f /tmp/kvma.fifo
    mkfifo /tmp/kvma.fifo
    insmod "$KO" "$@" || fail "insmod $* failed"
}

print_state() {
    while IFS= read -r line; do echo "$line"; done < "$P/state"
}

# every CPU line of parameters/state has FIELD=VALUE ($1=$2)
all_cpus_nofork() {
    n=0
    m=0
    while IFS= read -r line; do
        case $line in
            cpu*)
                n=$((n + 1))
                case " $line " in *" $1=$2 "*) m=$((m + 1)) ;; esac
                ;;
        esac
    done < "$P/state"
    [ "$n" -gt 0 ] && [ "$n" = "$m" ]
}

# One second without forking a sleep: a read that times out on a FIFO nobody writes.
pause_nofork() { read -r -t 1 _ <> /tmp/kvma.fifo || true; }

undo_wp() {
    echo wp > "$P/undo" || fail "could not undo the wp attack"
    all_cpus_nofork wp 1 || fail "CR0.WP is still clear after parameters/undo"
}

unload() {
    rmmod kvma_attack || fail "rmmod failed"
    loaded && fail "still in /proc/modules after rmmod"
    [ ! -e /sys/module/kvma_attack ] || fail "/sys/module/kvma_attack still exists after rmmod"
    expect_log "kvma_attack: unloaded"
}

# The guest still forks, execs and answers getpid/getppid correctly.
sane() {
    # getppid (as ash's $PPID) against the parent the kernel shows in /proc/<pid>/stat.
    out=$(sh -c 'echo $PPID $(cut -d" " -f4 /proc/$$/stat)')
    set -- $out
    [ $# = 2 ] && [ "$1" = "$2" ] || fail "getppid in a child returned $1, /proc says $2"
    sh -c 'echo $$ > /tmp/kvma.pid' &
    child=$!
    wait "$child"
    [ "$(cat /tmp/kvma.pid)" = "$child" ] || fail "getpid in a child returned '$(cat /tmp/kvma.pid)', expected $child"
    [ "$(echo hello | cat)" = hello ] || fail "pipe/exec broken"
}

state_field() { tr ' ' '\n' < "$P/state" | sed -n "s/^$1=//p" | tail -n1; }

t_clean() {
    load
    loaded || fail "not in /proc/modules"
    [ -d /sys/module/kvma_attack ] || fail "no /sys/module/kvma_attack"
    cat "$P/state"
    all_cpus_nofork wp 1 || fail "CR0.WP off without an attack"
    sane
    unload
}

t_syscall() {
    load attack=syscall
    expect_log "kvma_attack: syscall done: sys_call_table="
    sane
    cat "$P/state"
    unload
    expect_log "kvma_attack: syscall undone"
}

t_inline() {
    load attack=inline
    expect_log "kvma_attack: inline done: function=__x64_sys_getppid"
    before=$(state_field inline_hits)
    sane
    after=$(state_field inline_hits)
    [ "$after" -gt "$before" ] || fail "getppid did not go through the inline hook ($before -> $after)"
    echo "inline_hits $before -> $after"
    unload
    expect_log "kvma_attack: inline undone"
    sane
}

t_idt() {
    load attack=idt
    expect_log "kvma_attack: idt done: vector=0x"
    line=$(new_log | grep 'idt done' | tail -n1)
    new=$(echo "$line" | sed -n 's/.* new=\([0-9a-f]*\) .*/\1/p')
    live=$(echo "$line" | sed -n 's/.* live=\([0-9a-f]*\).*/\1/p')
    [ -n "$new" ] && [ "$new" = "$live" ] || fail "the gate read through IDTR ($live) is not the new handler ($new)"
    sane
    unload
    expect_log "kvma_attack: idt undone"
}

t_gdt() {
    load attack=gdt
    expect_log "kvma_attack: gdt done: slot=10 selector=0x50 type=call-gate64 dpl=3"
    desc=$(new_log | sed -n 's/.*gdt done: .* desc=\([0-9a-f]*\) .*/\1/p' | tail -n1)
    ncpu=$(grep -c '^processor' /proc/cpuinfo)
    seen=$(new_log | grep -c "gdt cpu[0-9]*: .* = $desc")
    [ -n "$desc" ] && [ "$seen" = "$ncpu" ] || fail "the call gate is visible through GDTR on $seen of $ncpu CPUs"
    sane
    unload
    expect_log "kvma_attack: gdt undone"
}

t_wp() {
    load_nofork attack=wp
    print_state
    all_cpus_nofork wp 0 || fail "CR0.WP is not clear on every CPU"
    pause_nofork
    all_cpus_nofork wp 0 || fail "CR0.WP came back on by itself"
    undo_wp
    expect_log "kvma_attack: loaded"
    expect_log "kvma_attack: wp done: CR0.WP cleared"
    expect_log "kvma_attack: wp undone"
    sane
    unload
}

t_smep() {
    load attack=smep
    expect_log "kvma_attack: smep done: CR4.SMEP cleared"
    cat "$P/state"
    all_cpus_nofork smep 0 || fail "CR4.SMEP is not clear on every CPU"
    sane
    sleep 1
    all_cpus_nofork smep 0 || fail "CR4.SMEP came back on by itself"
    unload
    expect_log "kvma_attack: smep undone"
}

t_ftrace() {
    load attack=ftrace
    expect_log "kvma_attack: ftrace done: function=__x64_sys_getpid"
    # ftrace names the address by its alias __do_sys_getpid.
    grep 'sys_getpid' /sys/kernel/tracing/enabled_functions ||
        fail "sys_getpid not in /sys/kernel/tracing/enabled_functions"
    before=$(state_field ftrace_hits)
    sane
    after=$(state_field ftrace_hits)
    [ "$after" -gt "$before" ] || fail "getpid was not redirected ($before -> $after)"
    echo "ftrace_hits $before -> $after"
    unload
    expect_log "kvma_attack: ftrace undone"
    if grep -q 'sys_getpid' /sys/kernel/tracing/enabled_functions; then
        fail "sys_getpid still in enabled_functions after rmmod"
    fi
    sane
}

t_hide() {
    load attack=hide
    expect_log "kvma_attack: hide done: module="
    loaded && fail "still listed in /proc/modules"
    [ -d /sys/module/kvma_attack ] || fail "/sys/module/kvma_attack is gone"
    if rmmod kvma_attack 2>/dev/null; then fail "rmmod found the hidden module"; fi
    sane
    echo 1 > "$P/unhide"
    expect_log "kvma_attack: hide undone"
    loaded || fail "not back in /proc/modules after unhide"
    unload
}

# A process that records every SIGWINCH it gets in /tmp/kvma.winch.<tag>.
start_victim() {
    rm -f "/tmp/kvma.winch.$1"
    sh -c 'trap "echo winch >> /tmp/kvma.winch.$0" WINCH; while :; do sleep 1; done' "$1" &
    victim=$!
}

# kill -1 signals every process on the task list (but init and the sender).
winch_all() { kill -WINCH -1; sleep 3; }

t_hideproc() {
    start_victim hidden
    hidden=$victim
    start_victim control
    control=$victim
    sleep 1
    load hideproc="$hidden"
    expect_log "kvma_attack: hideproc done: pid=$hidden "
    [ -d "/proc/$hidden" ] || fail "/proc/$hidden is gone (it should stay in the PID table)"
    [ "$(state_field hidden_pid)" = "$hidden" ] || fail "state does not show the hidden pid"
    winch_all
    [ -s /tmp/kvma.winch.control ] || fail "the control process got no SIGWINCH from kill -1"
    [ ! -e /tmp/kvma.winch.hidden ] || fail "the hidden process got SIGWINCH from kill -1 (still on the task list)"
    sane
    unload
    expect_log "kvma_attack: hideproc undone: pid=$hidden .* relinked"
    winch_all
    [ -s /tmp/kvma.winch.hidden ] || fail "the relinked process got no SIGWINCH from kill -1"
    kill "$hidden" "$control"
    wait "$hidden" "$control" 2>/dev/null || true
}

# A process that exits (and is reaped) while unlinked: the kernel's own unlink must be harmless
# and rmmod must not relink a dead task.
t_hideexit() {
    sleep 2 &
    pid=$!
    load hideproc="$pid"
    expect_log "kvma_attack: hideproc done: pid=$pid "
    wait "$pid" || fail "the hidden process did not exit cleanly"
    [ ! -e "/proc/$pid" ] || fail "/proc/$pid still exists after the process was reaped"
    sane
    unload
    expect_log "kvma_attack: hideproc undone: pid=$pid .* had exited"
}

# Everything at once, then everything undone.
t_all() {
    start_victim all
    pid=$victim
    sleep 1
    load_nofork attack=syscall,inline,idt,gdt,wp,smep,ftrace,hide hideproc="$pid"
    print_state
    all_cpus_nofork wp 0 || fail "CR0.WP is not clear on every CPU"
    all_cpus_nofork smep 0 || fail "CR4.SMEP is not clear on every CPU"
    undo_wp
    expect_log "kvma_attack: loaded"
    for a in syscall inline idt gdt wp smep ftrace hideproc hide; do
        expect_log "kvma_attack: $a done:"
    done
    loaded && fail "still listed in /proc/modules"
    cat "$P/state"
    sane
    echo 1 > "$P/unhide"
    unload
    for a in syscall inline idt gdt wp smep ftrace hideproc hide; do
        expect_log "kvma_attack: $a undone"
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    sane
}

run_case() {
    case_name=$1
    case "$1" in
        clean | syscall | inline | idt | gdt | wp | smep | ftrace | hide | hideproc | hideexit | all) ;;
        *) echo "unknown case $1" >&2; exit 2 ;;
    esac
    [ -f "$KO" ] || fail "$KO missing (run \`make guest\`)"
    echo "KVMA-SELFTEST $1 START"
    case_mark=$(dmesg | wc -l)
    "t_$1"
    show_log
    echo "KVMA-SELFTEST $1 PASS"
}

if [ $# -eq 0 ]; then
    set -- clean syscall inline idt gdt wp smep ftrace hide hideproc hideexit all
fi
for c in "$@"; do
    # Each case in a subshell so that one failure still reports cleanly.
    (run_case "$c") || exit 1
done
