// SPDX-License-Identifier: GPL-2.0
/*
 * Two programs that read what tracepoint records leave out from KVM's own
 * structures (CO-RE).
 *
 * kvmmmu:kvm_mmu_get_page with what its tracepoint record leaves out, read
 * from the shadow page itself (struct kvm_mmu_page, CO-RE): whether a TDP MMU
 * page is a root (it has no parent entry) and the host-physical address of
 * its table -- the address a vCPU's root pointer, or an IOMMU sharing the
 * table, holds.
 *
 * Records go out in the probes' common layout (probes/common: struct Record),
 * probe id 27, data:
 *   [0, 4)   role word            [4] created   [5] tdp_mmu_page
 *   [6]      has a parent entry   [7] the address below is known
 *   [8, 16)  gfn                  [16, 24) table host-physical address
 *
 * kvm:kvm_entry: a vCPU's CR0 and CR4 as it enters the guest, recorded when
 * either differs from what this vCPU entered with last time (and on its first
 * entry).  KVM emulates the control-register writes it intercepts, and
 * kvm:kvm_cr fires only for some of them (not under SVM without decode
 * assists, e.g. QEMU's TCG); the values it runs the guest with are the ones
 * that decide whether the MMU role changed.  Probe id 28, data:
 *   [0, 8)   CR0                  [8, 16) CR4
 *   [16, 20) vcpu_id              [20] changed: bit 0 CR0, bit 1 CR4
 */
#include "kvm_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define PROBE_ID 27
#define PROBE_ID_CR 28
/* A VMM's vCPUs, by struct kvm_vcpu address: far more than any VM has. */
#define MAX_VCPUS 4096
#define RECORD_DATA 64
/* x86-64's direct map without KASLR of memory regions. */
#define PAGE_OFFSET_BASE_L4 0xffff888000000000ULL

struct record {
	u32 probe;
	u32 tgid;
	u32 tid;
	u32 cpu;
	u64 ts_ns;
	u64 latency_ns;
	s64 ret;
	u8 data[RECORD_DATA];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} CORE_EVENTS SEC(".maps");

/* Records the ring buffer could not take. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u64);
} CORE_DROPS SEC(".maps");

/* The CR0 and CR4 each vCPU last entered with. */
struct cr_values {
	u64 cr0;
	u64 cr4;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VCPUS);
	__type(key, u64);
	__type(value, struct cr_values);
} LAST_CR SEC(".maps");

/* Only this process (the VMM), when set. */
const volatile u32 target_tgid = 0;

/* The direct map's base (randomized with CONFIG_RANDOMIZE_MEMORY). */
extern const void page_offset_base __ksym __weak;

/* A record for `probe` from the ring buffer, its header filled; NULL (counted) when full. */
static __always_inline struct record *new_record(u32 probe, u64 id)
{
	u32 zero = 0;
	struct record *r;
	u64 *drops;

	r = bpf_ringbuf_reserve(&CORE_EVENTS, sizeof(*r), 0);
	if (!r) {
		drops = bpf_map_lookup_elem(&CORE_DROPS, &zero);
		if (drops)
			__sync_fetch_and_add(drops, 1);
		return NULL;
	}
	__builtin_memset(r, 0, sizeof(*r));
	r->probe = probe;
	r->tgid = id >> 32;
	r->tid = (u32)id;
	r->cpu = bpf_get_smp_processor_id();
	r->ts_ns = bpf_ktime_get_ns();
	return r;
}

SEC("tp_btf/kvm_mmu_get_page")
int BPF_PROG(mmu_get_page, struct kvm_mmu_page *sp, bool created)
{
	u64 id = bpf_get_current_pid_tgid();
	u64 base = PAGE_OFFSET_BASE_L4, spt;
	struct record *r;

	if (target_tgid && (u32)(id >> 32) != target_tgid)
		return 0;
	r = new_record(PROBE_ID, id);
	if (!r)
		return 0;

	if (&page_offset_base)
		bpf_probe_read_kernel(&base, sizeof(base), &page_offset_base);
	spt = (u64)BPF_CORE_READ(sp, spt);

	*(u32 *)&r->data[0] = BPF_CORE_READ(sp, role.word);
	r->data[4] = created;
	r->data[5] = BPF_CORE_READ(sp, tdp_mmu_page);
	r->data[6] = BPF_CORE_READ(sp, ptep) != 0;
	r->data[7] = spt >= base;
	*(u64 *)&r->data[8] = BPF_CORE_READ(sp, gfn);
	*(u64 *)&r->data[16] = spt >= base ? spt - base : 0;
	bpf_ringbuf_submit(r, 0);
	return 0;
}

SEC("tp_btf/kvm_entry")
int BPF_PROG(kvm_entry_cr, struct kvm_vcpu *vcpu)
{
	u64 id = bpf_get_current_pid_tgid(), key = (u64)vcpu;
	struct cr_values now, *last;
	struct record *r;
	u8 changed;

	if (target_tgid && (u32)(id >> 32) != target_tgid)
		return 0;
	now.cr0 = BPF_CORE_READ(vcpu, arch.cr0);
	now.cr4 = BPF_CORE_READ(vcpu, arch.cr4);
	last = bpf_map_lookup_elem(&LAST_CR, &key);
	if (last)
		changed = (last->cr0 != now.cr0) | (last->cr4 != now.cr4) << 1;
	else
		changed = 3;
	if (!changed)
		return 0;
	bpf_map_update_elem(&LAST_CR, &key, &now, BPF_ANY);
	r = new_record(PROBE_ID_CR, id);
	if (!r)
		return 0;
	*(u64 *)&r->data[0] = now.cr0;
	*(u64 *)&r->data[8] = now.cr4;
	*(u32 *)&r->data[16] = BPF_CORE_READ(vcpu, vcpu_id);
	r->data[20] = changed;
	bpf_ringbuf_submit(r, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
