/*
 * Entry point of Godwit's built-in guests (see docs/guest-abi.md, "Entry state").
 *
 * Every vCPU starts here, at the first byte of the image (0x10_0000), in 64-bit mode at CPL3
 * with rdi = vCPU index, rsi = the ABI block (0x5_0000) and rsp = its 16-byte aligned stack
 * top. Those are already the System V arguments of guest_main(vcpu, abi), so just call it.
 * guest.ld places .text.start first in the image.
 */
	.section .text.start, "ax", @progbits
	.globl	_start
	.type	_start, @function
_start:
	xorl	%ebp, %ebp		/* terminate the frame-pointer chain */
	cld				/* the C ABI wants DF clear; rflags should already say so */
	call	guest_main		/* rsp is 16-byte aligned here, as the ABI wants at a call */

	/*
	 * guest_main should never return; if it does, idle forever. hlt faults at CPL3, so sleep
	 * through the monitor's sleep port (0x500) with "until woken" (0xffff_ffff), in a loop
	 * because a pause or stop ends the sleep early.
	 */
1:	movl	$0xffffffff, %eax
	movw	$0x500, %dx
	outl	%eax, %dx
	jmp	1b
	.size	_start, . - _start

/* No executable stack (silences the linker's warning). */
	.section .note.GNU-stack, "", @progbits
