/* hv-step-loop: N = 100 * argc iterations of a three-instruction loop, then
 * exit_group(0).  No libc: every instruction it runs is below, so a stepper
 * must count exactly (loop_head..loop_end) * N + the rest, and one block per
 * taken branch (the loop's N - 1 taken jnz) plus the first. */
    .text
    .globl _start
_start:
    mov (%rsp), %rcx
    imul $100, %rcx, %rcx
    xor %eax, %eax
    .globl loop_head
loop_head:
    add %rcx, %rax
    dec %rcx
    jnz loop_head
    .globl loop_end
loop_end:
    mov $231, %eax
    xor %edi, %edi
    syscall
    .section .note.GNU-stack, "", @progbits
