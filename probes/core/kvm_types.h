/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The few kernel types mmu_page.bpf.c reads, by name only: with
 * preserve_access_index every access is relocated by libbpf against the
 * running kernel's BTF, so the layout here need not match any kernel's
 * (no vmlinux.h is generated, and one object runs on every kernel that has
 * these members).
 */
#ifndef TDPSHARE_KVM_TYPES_H
#define TDPSHARE_KVM_TYPES_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed int __s32;
typedef signed long long __s64;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s64 s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_RINGBUF = 27,
};

/* bpf_map_update_elem()'s flags */
enum {
	BPF_ANY = 0,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

/* arch/x86/include/asm/kvm_host.h */
union kvm_mmu_page_role {
	u32 word;
};

/* arch/x86/kvm/mmu/mmu_internal.h (ptep sits in an anonymous union there) */
struct kvm_mmu_page {
	bool tdp_mmu_page;
	union kvm_mmu_page_role role;
	u64 gfn;
	u64 *spt;
	u64 *ptep;
};

/* arch/x86/include/asm/kvm_host.h */
struct kvm_vcpu_arch {
	unsigned long cr0;
	unsigned long cr4;
};

/* include/linux/kvm_host.h */
struct kvm_vcpu {
	int vcpu_id;
	struct kvm_vcpu_arch arch;
};

#pragma clang attribute pop

#endif
