//! Attaching to a running QEMU: memory layout, RAM access, registers and run control.

use crate::error::{Error, Result};
use crate::mtree::{self, RamRange};
use crate::qmp::QmpClient;
use crate::ram::{GuestRam, MappedFile, RamSource, SpanSource};
use crate::regs;
use kvmaccess_core::{
    Gpa, PhysRange, PhysicalMemory, PhysicalMemoryWrite, Registers, VcpuState, VmControl,
};
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Type, S, DPL, P (bits 8-15) and AVL, L, D/B, G (bits 20-23) plus limit 19:16, as HMP prints them.
const SEGMENT_ATTRIBUTE_BITS: u32 = 0x00ff_ff00;

/// How to reach guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamMode {
    /// Map the shared RAM file if there is one, else fall back to `/proc/PID/mem` and record a
    /// notice ([`QemuVm::notice`]).
    #[default]
    Auto,
    /// Only a shared mapping; fail with [`Error::NoSharedRam`] otherwise.
    SharedOnly,
    /// Always `/proc/PID/mem` (for cross-checks, or RAM that is shared but not openable).
    ProcMem,
}

/// Where register snapshots come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RegisterSource {
    /// HMP `info registers -a`: one text round trip, complete including EFER, and it does not
    /// stop the guest. The default: measured faster than a dump on QEMU 7.2 (see crate docs).
    #[default]
    Hmp,
    /// `dump-guest-memory` of one page, decoding the binary QEMU CPU-state notes. Has
    /// KERNEL_GS_BASE but no EFER, and QEMU stops and resumes a running guest around the dump.
    Dump,
    /// Both, merged: dump values, plus EFER from HMP. Two round trips.
    Merged,
}

/// Options for [`QemuVm::attach_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct AttachOptions {
    /// Allow [`PhysicalMemoryWrite`]: opens the RAM file (or `/proc/PID/mem`) read-write. Off by
    /// default; the CLI turns it on only for `--allow-write`.
    pub allow_write: bool,
    /// How to reach guest RAM.
    pub ram: RamMode,
    /// Where [`VcpuState`] reads registers from.
    pub registers: RegisterSource,
}

/// A live QEMU guest reached through its QMP socket.
#[derive(Debug)]
pub struct QemuVm {
    qmp: QmpClient,
    pid: Option<u32>,
    ram: GuestRam,
    ram_layout: Vec<RamRange>,
    vcpu_count: usize,
    options: AttachOptions,
    notice: Option<String>,
    dump_dir: std::sync::Mutex<Option<PathBuf>>,
    dump_seq: AtomicU64,
}

impl QemuVm {
    /// Attach read-only to the QEMU behind `socket`, with automatic RAM access.
    pub fn attach(socket: impl AsRef<Path>) -> Result<Self> {
        Self::attach_with(socket, AttachOptions::default())
    }

    /// Attach with explicit options.
    pub fn attach_with(socket: impl AsRef<Path>, options: AttachOptions) -> Result<Self> {
        let qmp = QmpClient::connect(socket)?;
        Self::from_client(qmp, options)
    }

    /// Attach over an already connected QMP client.
    pub fn from_client(qmp: QmpClient, options: AttachOptions) -> Result<Self> {
        let pid = qmp.peer_pid();
        let flat = mtree::parse_memory_flatview(&qmp.hmp("info mtree -f")?)?;
        let memdevs = query_memdevs(&qmp)?;
        let blocks = mtree::parse_ramblocks(&qmp.hmp("info ramblock")?);
        let mut names: Vec<String> = memdevs.iter().map(|m| m.id.clone()).collect();
        if let Some((largest, _)) = blocks.iter().max_by_key(|(_, used)| *used) {
            if !names.contains(largest) {
                names.push(largest.clone());
            }
        }
        let layout = mtree::ram_ranges(&flat, &names);
        if layout.is_empty() {
            return Err(Error::protocol(
                "info mtree -f",
                format!("no guest RAM found (looked for regions named {names:?})"),
            ));
        }

        let (ram, notice) = build_ram(&qmp, pid, &layout, &memdevs, options)?;
        let cpus = qmp.execute("query-cpus-fast", Value::Null)?;
        let vcpu_count = cpus.as_array().map_or(0, Vec::len);
        if vcpu_count == 0 {
            return Err(Error::protocol("query-cpus-fast", cpus.to_string()));
        }
        Ok(Self {
            qmp,
            pid,
            ram,
            ram_layout: layout,
            vcpu_count,
            options,
            notice,
            dump_dir: std::sync::Mutex::new(None),
            dump_seq: AtomicU64::new(0),
        })
    }

    /// The QMP connection, for commands this type does not wrap and for events
    /// ([`QmpClient::wait_event`], [`QmpClient::try_recv_event`], ...).
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// QEMU's PID, from the socket's peer credentials.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How guest RAM is being read.
    pub fn ram_source(&self) -> RamSource {
        self.ram.source()
    }

    /// The RAM layout as QEMU reported it: each range with its backing region and offset.
    pub fn ram_layout(&self) -> &[RamRange] {
        &self.ram_layout
    }

    /// A message for the user when attach had to fall back (e.g. to `/proc/PID/mem`).
    pub fn notice(&self) -> Option<&str> {
        self.notice.as_deref()
    }

    /// Whether writes were enabled at attach time.
    pub fn writes_allowed(&self) -> bool {
        self.options.allow_write
    }

    /// Counter bumped on every RESUME/RESET event and every [`VmControl::resume`]: translations
    /// cached while it keeps its value are still valid (provided the guest stayed paused).
    pub fn generation(&self) -> u64 {
        self.qmp.generation()
    }

    /// Stop the vCPUs (QMP `stop`).
    pub fn stop(&self) -> Result<()> {
        self.qmp.execute("stop", Value::Null).map(drop)
    }

    /// Resume the vCPUs (QMP `cont`).
    pub fn cont(&self) -> Result<()> {
        self.qmp.bump_generation();
        self.qmp.execute("cont", Value::Null).map(drop)
    }

    /// QEMU's run state (`running`, `paused`, `shutdown`, `guest-panicked`, ...).
    pub fn status(&self) -> Result<String> {
        let st = self.qmp.execute("query-status", Value::Null)?;
        st.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::protocol("query-status", st.to_string()))
    }

    /// Registers of every vCPU from HMP `info registers -a`.
    pub fn registers_hmp(&self) -> Result<Vec<Registers>> {
        regs::parse_hmp_registers(&self.qmp.hmp("info registers -a")?)
    }

    /// Registers of every vCPU from the CPU-state notes of a one-page `dump-guest-memory`.
    /// QEMU stops a running guest for the dump and resumes it afterwards (emitting STOP and
    /// RESUME events).
    pub fn registers_dump(&self) -> Result<Vec<Registers>> {
        let notes = self.dump_notes()?;
        if notes.vcpus.is_empty() {
            return Err(Error::protocol(
                "dump-guest-memory",
                "the core has no CPU-state notes",
            ));
        }
        let mut vcpus = notes.vcpus;
        for r in &mut vcpus {
            for seg in [
                &mut r.cs,
                &mut r.ds,
                &mut r.es,
                &mut r.fs,
                &mut r.gs,
                &mut r.ss,
                &mut r.ldtr,
                &mut r.tr,
            ] {
                // QEMU's segment cache keeps the descriptor's whole high dword, base bits 16-23
                // and 24-31 included; HMP prints only the attribute bits. Keep those, so both
                // sources report the same value (the base is in `base`, complete).
                seg.flags &= SEGMENT_ATTRIBUTE_BITS;
            }
        }
        Ok(vcpus)
    }

    /// The notes of a one-page `dump-guest-memory`: registers of every vCPU and, when the guest
    /// published it through `-device vmcoreinfo`, the VMCOREINFO text.
    pub fn dump_notes(&self) -> Result<kvmaccess_dump::CoreNotes> {
        let dir = self.dump_dir()?;
        let seq = self.dump_seq.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("regs-{seq}.elf"));
        let protocol = format!("file:{}", path.display());
        let run = self.qmp.execute(
            "dump-guest-memory",
            json!({ "paging": false, "protocol": protocol, "begin": 0, "length": 4096 }),
        );
        let bytes = run.and_then(|_| {
            std::fs::read(&path).map_err(|e| {
                Error::io(
                    format!(
                        "reading QEMU's register dump {} (QEMU must be able to write there and \
                         we must be able to read it)",
                        path.display()
                    ),
                    e,
                )
            })
        });
        // Best effort: the file is in our private directory, which Drop removes anyway.
        let _ = std::fs::remove_file(&path);
        kvmaccess_dump::parse_core_notes(&bytes?)
            .map_err(|e| Error::protocol("dump-guest-memory core", e.to_string()))
    }

    /// Dump notes merged with EFER from HMP.
    pub fn registers_merged(&self) -> Result<Vec<Registers>> {
        let mut dump = self.registers_dump()?;
        let hmp = self.registers_hmp()?;
        for r in &mut dump {
            r.efer = hmp.iter().find(|h| h.vcpu == r.vcpu).and_then(|h| h.efer);
        }
        Ok(dump)
    }

    /// Registers from the source chosen at attach time.
    pub fn registers_all(&self) -> Result<Vec<Registers>> {
        match self.options.registers {
            RegisterSource::Hmp => self.registers_hmp(),
            RegisterSource::Dump => self.registers_dump(),
            RegisterSource::Merged => self.registers_merged(),
        }
    }

    fn dump_dir(&self) -> Result<PathBuf> {
        let mut guard = self.dump_dir.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = guard.as_ref() {
            return Ok(d.clone());
        }
        // A directory only we can enter: QEMU (often root) creates the dump file by name, so a
        // predictable path in a shared directory would let another user plant a symlink.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("kvmaccess-regs-{}-{nanos}", std::process::id()));
        let mut builder = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        *guard = Some(dir.clone());
        Ok(dir)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let dir = self.dump_dir.get_mut().map(Option::take).unwrap_or(None);
        if let Some(d) = dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl PhysicalMemory for QemuVm {
    #[inline]
    fn read_phys(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), kvmaccess_core::Error> {
        self.ram.read(gpa, buf)
    }

    fn phys_equals(&self, gpa: Gpa, expected: &[u8]) -> Result<bool, kvmaccess_core::Error> {
        self.ram.equals(gpa, expected)
    }

    fn ranges(&self) -> &[PhysRange] {
        self.ram.ranges()
    }

    fn data_ranges(&self, within: PhysRange) -> Vec<PhysRange> {
        self.ram.data_ranges(within)
    }

    fn invalidation_epoch(&self) -> Option<kvmaccess_core::InvalidationEpoch> {
        Some(self.qmp.invalidation_epoch())
    }
}

impl PhysicalMemoryWrite for QemuVm {
    fn write_phys(&self, gpa: Gpa, data: &[u8]) -> Result<(), kvmaccess_core::Error> {
        if !self.options.allow_write {
            return Err(Error::WriteNotAllowed.into());
        }
        self.ram.write(gpa, data)
    }
}

impl VcpuState for QemuVm {
    fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    fn registers(&self, vcpu: usize) -> Result<Registers, kvmaccess_core::Error> {
        if vcpu >= self.vcpu_count {
            return Err(kvmaccess_core::Error::NoSuchVcpu {
                index: vcpu,
                count: self.vcpu_count,
            });
        }
        self.registers_all()?
            .into_iter()
            .find(|r| r.vcpu == vcpu)
            .ok_or(kvmaccess_core::Error::NoSuchVcpu {
                index: vcpu,
                count: self.vcpu_count,
            })
    }

    fn all_registers(&self) -> Result<Vec<Registers>, kvmaccess_core::Error> {
        Ok(self.registers_all()?)
    }
}

impl VmControl for QemuVm {
    fn pause(&self) -> Result<(), kvmaccess_core::Error> {
        Ok(self.stop()?)
    }

    fn resume(&self) -> Result<(), kvmaccess_core::Error> {
        Ok(self.cont()?)
    }

    fn is_running(&self) -> Result<bool, kvmaccess_core::Error> {
        let st = self.qmp.execute("query-status", Value::Null)?;
        st.get("running")
            .and_then(Value::as_bool)
            .ok_or_else(|| Error::protocol("query-status", st.to_string()).into())
    }
}

#[derive(Debug)]
struct Memdev {
    id: String,
    share: bool,
}

fn query_memdevs(qmp: &QmpClient) -> Result<Vec<Memdev>> {
    let list = qmp.execute("query-memdev", Value::Null)?;
    let Some(items) = list.as_array() else {
        return Err(Error::protocol("query-memdev", list.to_string()));
    };
    Ok(items
        .iter()
        .filter_map(|m| {
            Some(Memdev {
                id: m.get("id")?.as_str()?.to_string(),
                share: m.get("share").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect())
}

fn qom_string(qmp: &QmpClient, id: &str, property: &str) -> Option<String> {
    qmp.execute(
        "qom-get",
        json!({ "path": format!("/objects/{id}"), "property": property }),
    )
    .ok()?
    .as_str()
    .map(str::to_string)
}

/// Host virtual address of a guest-physical address, via HMP `gpa2hva`.
fn gpa2hva(qmp: &QmpClient, gpa: u64) -> Result<u64> {
    let out = qmp.hmp(&format!("gpa2hva {gpa:#x}"))?;
    out.rsplit(" is ")
        .next()
        .map(str::trim)
        .and_then(|s| s.strip_prefix("0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| Error::protocol("gpa2hva", out.trim()))
}

/// One line of /proc/PID/maps.
#[derive(Debug)]
struct MapsEntry {
    start: u64,
    end: u64,
    shared: bool,
    offset: u64,
    inode: u64,
    path: String,
}

fn read_maps(pid: u32) -> std::io::Result<Vec<MapsEntry>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (a, b) = w.next()?.split_once('-')?;
            let perms = w.next()?;
            let offset = u64::from_str_radix(w.next()?, 16).ok()?;
            let _dev = w.next()?;
            let inode = w.next()?.parse().ok()?;
            let path = w.collect::<Vec<_>>().join(" ");
            Some(MapsEntry {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                shared: perms.as_bytes().get(3) == Some(&b's'),
                offset,
                inode,
                path,
            })
        })
        .collect())
}

fn open_ram_file(path: &Path, writable: bool) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(writable).open(path)
}

/// Find guest RAM's file: the backend's `mem-path` when it names a regular file, else the file
/// behind QEMU's shared mapping of the RAM block, through `/proc/PID/fd` (this covers memfd and
/// `mem-path` directories, where QEMU unlinks its temporary file).
fn build_ram(
    qmp: &QmpClient,
    pid: Option<u32>,
    layout: &[RamRange],
    memdevs: &[Memdev],
    options: AttachOptions,
) -> Result<(GuestRam, Option<String>)> {
    let shared_failure = if options.ram == RamMode::ProcMem {
        "/proc/PID/mem was requested".to_string()
    } else {
        match shared_ram(qmp, pid, layout, memdevs, options.allow_write) {
            Ok(ram) => return Ok((ram, None)),
            Err(reason) => reason,
        }
    };
    let Some(pid) = pid else {
        return Err(Error::NoSharedRam {
            pid: 0,
            reason: format!(
                "{shared_failure}; and QEMU's PID is unknown (SO_PEERCRED gave none), so \
                 /proc/PID/mem cannot be used either"
            ),
        });
    };
    let notice = if options.ram == RamMode::ProcMem {
        format!(
            "reading guest RAM through /proc/{pid}/mem as requested; this needs root or ptrace \
             rights (CAP_SYS_PTRACE)"
        )
    } else {
        let e = Error::NoSharedRam {
            pid,
            reason: shared_failure,
        };
        if options.ram == RamMode::SharedOnly {
            return Err(e);
        }
        e.to_string()
    };
    let mem_path = format!("/proc/{pid}/mem");
    let mem = OpenOptions::new()
        .read(true)
        .write(options.allow_write)
        .open(&mem_path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::ProcMemDenied { pid, source: e },
            _ => Error::io(format!("opening {mem_path}"), e),
        })?;
    let mut spans = Vec::new();
    for r in layout {
        spans.push((
            r.start,
            r.end,
            SpanSource::ProcMem {
                hva: gpa2hva(qmp, r.start)?,
            },
        ));
    }
    // Fail now, with the permission message, rather than on the first read: opening
    // /proc/PID/mem can succeed where reading it is refused.
    if let Some((_, _, SpanSource::ProcMem { hva })) = spans.first() {
        let mut probe = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&mem, &mut probe, *hva).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                Error::ProcMemDenied { pid, source: e }
            } else {
                Error::io(format!("reading {mem_path} at {hva:#x}"), e)
            }
        })?;
    }
    let ram = GuestRam::new(spans, Vec::new(), Some((pid, mem)))?;
    Ok((ram, Some(notice)))
}

fn shared_ram(
    qmp: &QmpClient,
    pid: Option<u32>,
    layout: &[RamRange],
    memdevs: &[Memdev],
    writable: bool,
) -> std::result::Result<GuestRam, String> {
    let mut files: Vec<MappedFile> = Vec::new();
    let mut file_of_region: Vec<(String, usize, u64)> = Vec::new();
    let mut spans = Vec::new();
    let mut maps: Option<Vec<MapsEntry>> = None;
    for r in layout {
        let Some(dev) = memdevs.iter().find(|m| m.id == r.region) else {
            return Err(format!(
                "RAM region `{}` is not a memory backend (QEMU was started without \
                 -machine memory-backend=..., so RAM is private anonymous memory)",
                r.region
            ));
        };
        if !dev.share {
            return Err(format!("memory backend `{}` has share=off", dev.id));
        }
        if let Some((_, index, base)) = file_of_region.iter().find(|(n, _, _)| *n == r.region) {
            let offset = base
                .checked_add(r.offset)
                .ok_or_else(|| "file offset overflow".to_string())?;
            spans.push((
                r.start,
                r.end,
                SpanSource::File {
                    index: *index,
                    offset,
                },
            ));
            continue;
        }

        let mem_path = qom_string(qmp, &dev.id, "mem-path").map(PathBuf::from);
        let direct = mem_path.as_ref().filter(|p| p.is_file()).and_then(|p| {
            let f = open_ram_file(p, writable).ok()?;
            Some((p.clone(), f, 0u64))
        });
        let (path, file, base) = match direct {
            Some(found) => found,
            None => {
                let Some(pid) = pid else {
                    return Err(format!(
                        "backend `{}` has no openable mem-path and QEMU's PID is unknown",
                        dev.id
                    ));
                };
                if maps.is_none() {
                    maps = Some(read_maps(pid).map_err(|e| {
                        format!(
                            "cannot read /proc/{pid}/maps to find backend `{}`: {e}",
                            dev.id
                        )
                    })?);
                }
                let entries = maps.as_deref().unwrap_or(&[]);
                let hva = gpa2hva(qmp, r.start).map_err(|e| e.to_string())?;
                let Some(m) = entries.iter().find(|m| hva >= m.start && hva < m.end) else {
                    return Err(format!(
                        "no mapping in /proc/{pid}/maps holds host address {hva:#x}"
                    ));
                };
                if !m.shared || m.inode == 0 {
                    return Err(format!(
                        "QEMU maps backend `{}` privately ({})",
                        dev.id,
                        if m.path.is_empty() {
                            "anonymous"
                        } else {
                            &m.path
                        }
                    ));
                }
                let (fd_path, file) =
                    find_fd_by_inode(pid, m.inode, writable).ok_or_else(|| {
                        format!(
                        "none of /proc/{pid}/fd/* is the RAM file {} (inode {}); this needs the \
                         same user as QEMU or root",
                        m.path, m.inode
                    )
                    })?;
                // The block's start in the file: where the range's host address falls in the
                // mapping, minus the range's own offset in the block.
                let in_file = m
                    .offset
                    .checked_add(hva - m.start)
                    .and_then(|o| o.checked_sub(r.offset))
                    .ok_or_else(|| "inconsistent mapping offsets".to_string())?;
                (fd_path, file, in_file)
            }
        };
        let mapped = MappedFile::open(path, file, writable).map_err(|e| e.to_string())?;
        files.push(mapped);
        let index = files.len() - 1;
        file_of_region.push((r.region.clone(), index, base));
        let offset = base
            .checked_add(r.offset)
            .ok_or_else(|| "file offset overflow".to_string())?;
        spans.push((r.start, r.end, SpanSource::File { index, offset }));
    }
    GuestRam::new(spans, files, None).map_err(|e| e.to_string())
}

fn find_fd_by_inode(pid: u32, inode: u64, writable: bool) -> Option<(PathBuf, File)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for entry in dir.flatten() {
        let p = entry.path();
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.ino() == inode && meta.is_file() {
            if let Ok(f) = open_ram_file(&p, writable) {
                return Some((p, f));
            }
        }
    }
    None
}
