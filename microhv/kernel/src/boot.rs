//! The first instructions: the multiboot1 header, the 32-bit entry point that
//! QEMU `-kernel` and GRUB jump to, and the switch to long mode.
//!
//! The boot page tables identity-map the first 4 GiB with 2 MiB pages; they
//! live only until `mm::init` installs the real, W^X tables.

use core::arch::global_asm;

global_asm!(
    r#"
    .set MB_MAGIC, 0x1BADB002
    /* bit 0: modules page aligned, bit 1: memory map, bit 16: load addresses below */
    .set MB_FLAGS, (1 << 0) | (1 << 1) | (1 << 16)

    .section .multiboot, "a"
    .p2align 2
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long multiboot_header   /* header_addr */
    .long __image_start      /* load_addr */
    .long __load_end         /* load_end_addr */
    .long __image_end        /* bss_end_addr */
    .long _start32           /* entry_addr */

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov $boot_stack_top, %esp
    mov %eax, %edi              /* multiboot magic */
    mov %ebx, %esi              /* multiboot info (physical) */

    /* Long mode and NX are required. */
    mov $0x80000001, %eax
    cpuid
    test $(1 << 29), %edx
    jz no_long_mode
    test $(1 << 20), %edx
    jz no_long_mode

    /* PML4[0] -> PDPT; PDPT[0..4] -> PD[0..4]; PD: 2048 x 2 MiB identity. */
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add $boot_pd, %eax
    or $0x3, %eax
    mov %eax, boot_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 1b
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5), %eax          /* PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx       /* EFER */
    rdmsr
    or $((1 << 8) | (1 << 11)), %eax   /* LME, NXE */
    wrmsr
    mov %cr0, %eax
    or $((1 << 31) | (1 << 16) | 1), %eax   /* PG, WP, PE */
    mov %eax, %cr0
    lgdt boot_gdtr
    ljmp $0x08, $start64

no_long_mode:
    /* Say so on COM1 (no UART setup: QEMU and Bochs accept raw bytes) and stop. */
    mov $no_lm_msg, %esi
    mov $0x3f8, %dx
3:  lodsb
    test %al, %al
    jz 4f
    out %al, %dx
    jmp 3b
4:  hlt
    jmp 4b

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    movabs $boot_stack_top, %rsp
    mov %edi, %edi              /* zero-extend magic and info address */
    mov %esi, %esi
    xor %ebp, %ebp
    call kernel_main
5:  hlt
    jmp 5b

    .section .rodata
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF    /* 0x08: 64-bit code, ring 0 */
    .quad 0x00CF93000000FFFF    /* 0x10: data, ring 0 */
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
no_lm_msg:
    .asciz "microhv: this CPU has no long mode or no NX; stopping.\r\n"

    .section .bss
    .p2align 12
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4096 * 4
    .global boot_stack_bottom
boot_stack_bottom:
    .skip 65536
    .global boot_stack_top
boot_stack_top:
"#,
    options(att_syntax)
);
