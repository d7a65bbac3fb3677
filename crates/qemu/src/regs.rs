//! Parsing HMP `info registers -a`: text, one block per vCPU, with EFER but no KERNEL_GS_BASE.
//! (The other source, the CPU-state notes of a `dump-guest-memory` core, is decoded by
//! `kvmaccess-dump`.)

use crate::error::{Error, Result};
use kvmaccess_core::{DescriptorTable, Registers, Segment};

/// Parse HMP `info registers -a` (or plain `info registers`) into one snapshot per vCPU, in the
/// order QEMU prints them (`CPU#0`, `CPU#1`, ...). Handles the 64-bit layout (`RAX=`) and the
/// legacy one (`EAX=`) QEMU uses while a vCPU is outside long mode.
pub fn parse_hmp_registers(text: &str) -> Result<Vec<Registers>> {
    let mut out: Vec<Registers> = Vec::new();
    let mut current: Option<(Registers, u32)> = None;
    let mut rest = text;
    while !rest.is_empty() {
        let (raw, after) = rest.split_once('\n').unwrap_or((rest, ""));
        rest = after;
        let line = raw.trim_end_matches('\r');
        // From `FCW=` on, a vCPU's block is FPU and vector state (most of the text): go
        // straight to the next vCPU's header.
        if current.is_some() && line.starts_with("FCW=") {
            rest = memchr::memmem::find(rest.as_bytes(), b"CPU#")
                .and_then(|at| rest.get(at..))
                .unwrap_or("");
            continue;
        }
        if let Some(idx) = line.trim().strip_prefix("CPU#") {
            if let Some((regs, seen)) = current.take() {
                out.push(finish(regs, seen)?);
            }
            let vcpu = idx
                .trim()
                .parse::<usize>()
                .map_err(|_| Error::protocol("info registers", line))?;
            current = Some((
                Registers {
                    vcpu,
                    ..Registers::default()
                },
                0,
            ));
            continue;
        }
        let Some((regs, seen)) = current.as_mut() else {
            // `info registers` without -a prints no CPU# header for the current vCPU.
            if line.contains("IP=") {
                current = Some((Registers::default(), 0));
                if let Some((regs, seen)) = current.as_mut() {
                    parse_line(line, regs, seen)?;
                }
            }
            continue;
        };
        parse_line(line, regs, seen)?;
    }
    if let Some((regs, seen)) = current.take() {
        out.push(finish(regs, seen)?);
    }
    if out.is_empty() {
        return Err(Error::protocol("info registers", text));
    }
    Ok(out)
}

// Bits of `seen`: which mandatory values a block provided.
const SEEN_RIP: u32 = 1;
const SEEN_CR: u32 = 2;
const SEEN_GDT: u32 = 4;
const SEEN_IDT: u32 = 8;
const SEEN_CS: u32 = 16;
const SEEN_ALL: u32 = SEEN_RIP | SEEN_CR | SEEN_GDT | SEEN_IDT | SEEN_CS;

fn finish(regs: Registers, seen: u32) -> Result<Registers> {
    if seen & SEEN_ALL != SEEN_ALL {
        return Err(Error::protocol(
            "info registers",
            format!(
                "vCPU {} block lacks RIP, CR0-4, CS, GDT or IDT (mask {seen:#x})",
                regs.vcpu
            ),
        ));
    }
    Ok(regs)
}

/// Most values one key carries (`CS =0010 base limit flags DPL=0 CS64 [-RA]` has 4 + extras).
const MAX_VALUES: usize = 8;

/// Calls `visit` for each key of `R8 =0000 RIP=ffff [---Z-P-] CPL=0`: `("R8", ["0000"])`,
/// `("RIP", ["ffff", "[---Z-P-]"])`, ...: a word containing `=` starts a new key, later words are
/// extra values of that key. Allocates nothing: the monitor parses this text every pass, and
/// half of it is FPU/vector state it never uses.
fn for_each_field<'a>(
    line: &'a str,
    mut visit: impl FnMut(&'a str, &[&'a str]) -> Result<()>,
) -> Result<()> {
    let mut words = line.split_ascii_whitespace().peekable();
    let mut key: Option<&str> = None;
    let mut values: [&str; MAX_VALUES] = [""; MAX_VALUES];
    let mut count = 0;
    while let Some(word) = words.next() {
        // `R8 =...`, `ES =...`: the key and `=` are separated by padding.
        let starts_key = if word.contains('=') {
            word.split_once('=')
        } else {
            match words.peek().and_then(|next| next.strip_prefix('=')) {
                Some(value) => {
                    words.next();
                    Some((word, value))
                }
                None => None,
            }
        };
        match starts_key {
            Some((k, v)) => {
                if let Some(done) = key.replace(k) {
                    visit(done, &values[..count])?;
                }
                count = 0;
                if !v.is_empty() {
                    values[0] = v;
                    count = 1;
                }
            }
            None => {
                if key.is_some() && count < MAX_VALUES {
                    values[count] = word;
                    count += 1;
                }
            }
        }
    }
    if let Some(done) = key {
        visit(done, &values[..count])?;
    }
    Ok(())
}

fn hex(what: &str, s: &str) -> Result<u64> {
    u64::from_str_radix(s, 16)
        .map_err(|_| Error::protocol("info registers", format!("{what}={s} is not hex")))
}

fn hex_u32(what: &str, s: &str) -> Result<u32> {
    u32::try_from(hex(what, s)?)
        .map_err(|_| Error::protocol("info registers", format!("{what}={s} exceeds 32 bits")))
}

/// Lines of FPU, vector and debug state: skipped unread, they are most of the text.
const UNUSED_LINES: [&str; 7] = ["FPR", "YMM", "XMM", "ZMM", "Opmask", "FCW", "DR"];

fn parse_line(line: &str, r: &mut Registers, seen: &mut u32) -> Result<()> {
    if UNUSED_LINES.iter().any(|prefix| line.starts_with(prefix)) {
        return Ok(());
    }
    for_each_field(line, |key, vals| {
        let first = vals.first().copied();
        let gpr = |slot: &mut u64| -> Result<()> {
            if let Some(v) = first {
                *slot = hex(key, v)?;
            }
            Ok(())
        };
        match key {
            "RAX" | "EAX" => gpr(&mut r.rax)?,
            "RBX" | "EBX" => gpr(&mut r.rbx)?,
            "RCX" | "ECX" => gpr(&mut r.rcx)?,
            "RDX" | "EDX" => gpr(&mut r.rdx)?,
            "RSI" | "ESI" => gpr(&mut r.rsi)?,
            "RDI" | "EDI" => gpr(&mut r.rdi)?,
            "RBP" | "EBP" => gpr(&mut r.rbp)?,
            "RSP" | "ESP" => gpr(&mut r.rsp)?,
            "R8" => gpr(&mut r.r8)?,
            "R9" => gpr(&mut r.r9)?,
            "R10" => gpr(&mut r.r10)?,
            "R11" => gpr(&mut r.r11)?,
            "R12" => gpr(&mut r.r12)?,
            "R13" => gpr(&mut r.r13)?,
            "R14" => gpr(&mut r.r14)?,
            "R15" => gpr(&mut r.r15)?,
            "RIP" | "EIP" => {
                gpr(&mut r.rip)?;
                *seen |= SEEN_RIP;
            }
            "RFL" | "EFL" => gpr(&mut r.rflags)?,
            "CR0" => {
                gpr(&mut r.cr0)?;
                *seen |= SEEN_CR;
            }
            "CR2" => gpr(&mut r.cr2)?,
            "CR3" => gpr(&mut r.cr3)?,
            "CR4" => gpr(&mut r.cr4)?,
            "EFER" => {
                if let Some(v) = first {
                    r.efer = Some(hex(key, v)?);
                }
            }
            "ES" | "CS" | "SS" | "DS" | "FS" | "GS" | "LDT" | "TR" => {
                let seg = parse_segment(key, vals)?;
                match key {
                    "ES" => r.es = seg,
                    "CS" => {
                        r.cs = seg;
                        *seen |= SEEN_CS;
                    }
                    "SS" => r.ss = seg,
                    "DS" => r.ds = seg,
                    "FS" => r.fs = seg,
                    "GS" => r.gs = seg,
                    "LDT" => r.ldtr = seg,
                    _ => r.tr = seg,
                }
            }
            "GDT" | "IDT" => {
                let (Some(base), Some(limit)) = (vals.first(), vals.get(1)) else {
                    return Err(Error::protocol("info registers", line));
                };
                let table = DescriptorTable {
                    base: hex(key, base)?,
                    limit: hex_u32(key, limit)?,
                };
                if key == "GDT" {
                    r.gdtr = table;
                    *seen |= SEEN_GDT;
                } else {
                    r.idtr = table;
                    *seen |= SEEN_IDT;
                }
            }
            _ => {}
        }
        Ok(())
    })
}

/// `CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]`: selector, base, limit, flags.
fn parse_segment(key: &str, vals: &[&str]) -> Result<Segment> {
    let (Some(sel), Some(base), Some(limit), Some(flags)) =
        (vals.first(), vals.get(1), vals.get(2), vals.get(3))
    else {
        return Err(Error::protocol(
            "info registers",
            format!("segment {key} has fewer than 4 fields: {vals:?}"),
        ));
    };
    Ok(Segment {
        selector: u16::try_from(hex(key, sel)?)
            .map_err(|_| Error::protocol("info registers", format!("{key} selector {sel}")))?,
        base: hex(key, base)?,
        limit: hex_u32(key, limit)?,
        flags: hex_u32(key, flags)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HMP_64: &str = "\r\nCPU#0\r\nRAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000001 RDX=4000000000000000\r\nRSI=0000000000000083 RDI=000000000001085c RBP=ffffffff9c81aa40 RSP=ffffffff9c803e98\r\nR8 =0000000000000000 R9 =0000000038e3a8bc R10=00000000fffffffb R11=0000000000000001\r\nR12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000014790\r\nRIP=ffffffff9b817a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\nES =0000 0000000000000000 00000000 00000000\r\nCS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\nSS =0018 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\nDS =0000 0000000000000000 00000000 00000000\r\nFS =0000 0000000000000000 00000000 00000000\r\nGS =0000 ff42e9063bc00000 00000000 00000000\r\nLDT=0000 0000000000000000 00000000 00008200 DPL=0 LDT\r\nTR =0040 fffffe0000003000 00004087 00008900 DPL=0 TSS64-avl\r\nGDT=     fffffe0000001000 0000007f\r\nIDT=     fffffe0000000000 00000fff\r\nCR0=80050033 CR2=00000000005316e2 CR3=0000000018410000 CR4=00751eb0\r\nDR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000 \r\nDR6=00000000ffff0ff0 DR7=0000000000000400\r\nEFER=0000000000000d01\r\nFCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80\r\nFPR0=0000000000000000 0000 FPR1=0000000000000000 0000\r\nYMM00=0000000000000000 0000000000000000 53006c2d00687300 6b63616879747463\r\n\r\nCPU#1\r\nRAX=0000000000000001 RBX=0000000000000000 RCX=0000000000000001 RDX=4000000000000000\r\nRSI=0000000000000083 RDI=000000000003c8d4 RBP=ff42e90600274180 RSP=ff75ddd44009bed8\r\nR8 =0000000000000000 R9 =0000000038e3a8bc R10=0000000000000000 R11=0000000000000001\r\nR12=0000000000000001 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000\r\nRIP=ffffffff9b817a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\nES =0000 0000000000000000 00000000 00000000\r\nCS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\nSS =0018 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\nDS =0000 0000000000000000 00000000 00000000\r\nFS =0000 0000000000000000 00000000 00000000\r\nGS =0000 ff42e9063bd00000 00000000 00000000\r\nLDT=0000 0000000000000000 00000000 00008200 DPL=0 LDT\r\nTR =0040 fffffe000003e000 00004087 00008900 DPL=0 TSS64-avl\r\nGDT=     fffffe000003c000 0000007f\r\nIDT=     fffffe0000000000 00000fff\r\nCR0=80050033 CR2=000000003708a088 CR3=0000000100838000 CR4=00751ea0\r\nEFER=0000000000000d01\r\n";

    #[test]
    fn hmp_long_mode() {
        let v = parse_hmp_registers(HMP_64).unwrap();
        assert_eq!(v.len(), 2);
        let r = &v[0];
        assert_eq!(r.vcpu, 0);
        assert_eq!(r.rax, 0x1ad40);
        assert_eq!(r.r9, 0x38e3a8bc);
        assert_eq!(r.r15, 0x14790);
        assert_eq!(r.rip, 0xffffffff9b817a0b);
        assert_eq!(r.rflags, 0x246);
        assert_eq!(
            r.cs,
            Segment {
                selector: 0x10,
                base: 0,
                limit: 0xffffffff,
                flags: 0x00af9b00
            }
        );
        assert!(r.cs.long_mode());
        assert_eq!(r.gs.base, 0xff42e9063bc00000);
        assert_eq!(r.tr.selector, 0x40);
        assert_eq!(r.tr.limit, 0x4087);
        assert_eq!(r.ldtr.flags, 0x8200);
        assert_eq!(
            r.gdtr,
            DescriptorTable {
                base: 0xfffffe0000001000,
                limit: 0x7f
            }
        );
        assert_eq!(r.idtr.limit, 0xfff);
        assert_eq!(
            (r.cr0, r.cr2, r.cr3, r.cr4),
            (0x80050033, 0x5316e2, 0x18410000, 0x751eb0)
        );
        assert_eq!(r.efer, Some(0xd01));
        assert_eq!(r.kernel_gs_base, None);
        assert_eq!(v[1].vcpu, 1);
        assert_eq!(v[1].cr3, 0x100838000);
        assert_eq!(v[1].gdtr.base, 0xfffffe000003c000);
    }

    #[test]
    fn hmp_real_mode() {
        let text = "\nCPU#0\nEAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1\nESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000\nEIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\nES =0000 00000000 0000ffff 00009300\nCS =f000 ffff0000 0000ffff 00009b00\nSS =0000 00000000 0000ffff 00009300\nDS =0000 00000000 0000ffff 00009300\nFS =0000 00000000 0000ffff 00009300\nGS =0000 00000000 0000ffff 00009300\nLDT=0000 00000000 0000ffff 00008200\nTR =0000 00000000 0000ffff 00008b00\nGDT=     00000000 0000ffff\nIDT=     00000000 0000ffff\nCR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000\nEFER=0000000000000000\n";
        let v = parse_hmp_registers(text).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].rip, 0xfff0);
        assert_eq!(v[0].rdx, 0x60fb1);
        assert_eq!(v[0].cs.base, 0xffff0000);
        assert_eq!(v[0].cs.selector, 0xf000);
        assert_eq!(v[0].cr0, 0x60000010);
        assert_eq!(v[0].efer, Some(0));
    }

    #[test]
    fn fields_split_keys_values_and_cap_extras() {
        let mut seen = Vec::new();
        for_each_field(
            "R8 =0001 RIP=ffff [---Z-P-] CPL=0 GDT=     fffe 007f X=1 a b c d e f g h i j",
            |k, v| {
                seen.push((
                    k.to_string(),
                    v.len(),
                    v.first().copied().unwrap_or("").to_string(),
                ));
                Ok(())
            },
        )
        .unwrap();
        let keys: Vec<_> = seen
            .iter()
            .map(|(k, n, first)| (k.as_str(), *n, first.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("R8", 1, "0001"),
                ("RIP", 2, "ffff"),
                ("CPL", 1, "0"),
                ("GDT", 2, "fffe"),
                ("X", MAX_VALUES, "1")
            ]
        );
    }

    #[test]
    fn hmp_garbage_is_an_error() {
        assert!(parse_hmp_registers("").is_err());
        assert!(parse_hmp_registers("CPU#0\nRAX=zz\n").is_err());
        assert!(parse_hmp_registers("CPU#0\nRAX=0\n").is_err());
        assert!(parse_hmp_registers("CPU#0\nCS =0010 0000\n").is_err());
    }
}
