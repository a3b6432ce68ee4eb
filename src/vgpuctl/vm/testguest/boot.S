/*
 * vgpuctl test guest: multiboot (v1) entry, flat GDT, interrupt stubs.
 *
 * Loaded by QEMU's -kernel multiboot loader in 32-bit protected mode with
 * paging off; EAX holds the multiboot magic and EBX the multiboot info.
 */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* modules page-aligned, memory info wanted */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .bss
    .align 16
stack_bottom:
    .skip 32768
stack_top:

    .section .rodata
    .align 8
gdt:
    .quad 0x0000000000000000 /* null */
    .quad 0x00CF9A000000FFFF /* 0x08: code, flat 4 GiB, 32-bit */
    .quad 0x00CF92000000FFFF /* 0x10: data, flat 4 GiB */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .text
    .globl _start
_start:
    cli
    cld
    lgdt gdt_desc
    ljmp $0x08, $1f
1:
    mov $0x10, %cx
    mov %cx, %ds
    mov %cx, %es
    mov %cx, %fs
    mov %cx, %gs
    mov %cx, %ss
    mov $stack_top, %esp
    xor %ebp, %ebp
    push %ebx /* multiboot info */
    push %eax /* multiboot magic */
    call guest_main
2:
    cli
    hlt
    jmp 2b

/* Timer (IRQ0 after the PIC remap): count ticks, EOI. */
    .globl irq_timer_stub
irq_timer_stub:
    pusha
    call on_timer_irq
    popa
    iret

/* Everything else that is not an exception: ignore (covers spurious IRQ7/15). */
    .globl irq_ignore_stub
irq_ignore_stub:
    iret

/* CPU exceptions: report the vector on the debug console and stop. */
    .macro EXC vec
    .globl exc_stub_\vec
exc_stub_\vec:
    cli
    push $\vec
    call on_exception
    .endm

    EXC 0
    EXC 1
    EXC 2
    EXC 3
    EXC 4
    EXC 5
    EXC 6
    EXC 7
    EXC 8
    EXC 9
    EXC 10
    EXC 11
    EXC 12
    EXC 13
    EXC 14
    EXC 15
    EXC 16
    EXC 17
    EXC 18
    EXC 19
    EXC 20
    EXC 21
    EXC 22
    EXC 23
    EXC 24
    EXC 25
    EXC 26
    EXC 27
    EXC 28
    EXC 29
    EXC 30
    EXC 31

    .section .rodata
    .align 4
    .globl exc_stubs
exc_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long exc_stub_\vec
    .endr

    .section .note.GNU-stack, "", @progbits
