# SPDX-License-Identifier: GPL-2.0-only OR MIT
#
# The lab's L2 guest: 32-bit protected mode, flat segments, no paging, loaded
# at a fixed guest-physical address (the VMM's PAYLOAD_GPA).  Assembled by
# guest/build.rs with GNU as; position-independent (relative jumps only).
#
# The VMM sets EAX (operation), EDI (guest-physical address), ECX (count, not
# 0), EBX (seed) and RIP = the first byte, runs the vCPU, and takes the result
# from the OUT to port 0x10 (EAX).  Operations:
#   1 FILL   ECX dwords at EDI: dword i = EBX + i * 0x9e3779b9 (the DMA pattern)
#   2 TOUCH  ECX pages from EDI: the page's address into its first dword, as a
#            booting kernel initialising its memory map writes every page
#   3 SUM    ECX dwords at EDI: eax = rol(eax, 5) ^ dword, for each (what the
#            vCPU sees where the device wrote)
# Anything else returns 0xffffffff.

	.intel_syntax noprefix
	.code32
	.text
	.globl start
start:
	cld
	cmp	eax, 1
	je	fill
	cmp	eax, 2
	je	touch
	cmp	eax, 3
	je	sum
	mov	eax, 0xffffffff
	jmp	done

fill:
	mov	eax, ebx
1:	stosd
	add	eax, 0x9e3779b9
	loop	1b
	xor	eax, eax
	jmp	done

touch:
1:	mov	[edi], edi
	add	edi, 4096
	loop	1b
	xor	eax, eax
	jmp	done

sum:
	xor	eax, eax
1:	rol	eax, 5
	xor	eax, [edi]
	add	edi, 4
	loop	1b

done:
	mov	dx, 0x10
	out	dx, eax
	hlt
	jmp	done
