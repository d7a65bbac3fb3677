//! Attach to a running QEMU and report what kvmaccess-qemu sees, with register-read timings.
//!
//! `cargo run --release -p kvmaccess-qemu --example qemu_probe -- /path/to/qmp.sock [runs]`

use kvmaccess_core::{Gpa, PhysicalMemory};
use kvmaccess_qemu::{AttachOptions, QemuVm, RamMode};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(f());
        v.push(t.elapsed());
    }
    median(v)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let sock = args.next().ok_or("usage: qemu_probe QMP_SOCKET [runs]")?;
    let runs: usize = args.next().map_or(Ok(50), |s| s.parse())?;
    let vm = QemuVm::attach(&sock)?;
    println!("pid {:?}, RAM via {:?}", vm.pid(), vm.ram_source());
    for r in vm.ram_layout() {
        println!(
            "  {:#x}-{:#x} {} @{:#x}",
            r.start, r.end, r.region, r.offset
        );
    }
    let mut b = [0u8; 8];
    vm.read_phys(Gpa(0x1000), &mut b)?;
    // One clock read per batch: a clock read costs about as much as the copy itself.
    let n = 10_000_000u32;
    let t = Instant::now();
    for i in 0..n {
        let gpa = Gpa(0x1000 + u64::from(i & 0xff) * 8);
        vm.read_phys(std::hint::black_box(gpa), &mut b).ok();
        std::hint::black_box(&b);
    }
    println!("read_phys 8 bytes (shared map): {:?} each", t.elapsed() / n);
    // QEMU serves one QMP client per socket: let go of the first attachment before the second.
    drop(vm);
    let pm = QemuVm::attach_with(
        &sock,
        AttachOptions {
            ram: RamMode::ProcMem,
            ..Default::default()
        },
    );
    match pm {
        Err(e) => println!("/proc/PID/mem: {e}"),
        Ok(pm) => {
            let t = time(10_000, || {
                pm.read_phys(Gpa(0x1000), &mut b).ok();
                b
            });
            println!(
                "read_phys 8 bytes (/proc/PID/mem): {t:?}; notice: {:?}",
                pm.notice()
            );
        }
    }
    let vm = QemuVm::attach(&sock)?;
    for paused in [false, true] {
        if paused {
            vm.stop()?;
        }
        let rt = time(runs, || vm.status());
        println!("QMP round trip (query-status), paused={paused}: {rt:?}");
        let hmp = time(runs, || vm.registers_hmp().map(|r| r.len()));
        let dump = time(runs, || vm.registers_dump().map(|r| r.len()));
        let merged = time(runs, || vm.registers_merged().map(|r| r.len()));
        println!("registers, all vCPUs, paused={paused}, median of {runs}: hmp {hmp:?}, dump {dump:?}, merged {merged:?}");
    }
    vm.cont()?;
    let h = vm.registers_hmp()?;
    let d = vm.registers_dump()?;
    println!(
        "hmp  vcpu0: rip {:#x} cr3 {:#x} gdtr {:?} efer {:?}",
        h[0].rip, h[0].cr3, h[0].gdtr, h[0].efer
    );
    println!(
        "dump vcpu0: rip {:#x} cr3 {:#x} gdtr {:?} kgs {:?}",
        d[0].rip, d[0].cr3, d[0].gdtr, d[0].kernel_gs_base
    );
    Ok(())
}
