/* hv-step-calls: a call chain (outer -> middle -> inner, each with a short
 * loop), a write(2) of "calls\n" and exit_group(0).  No libc. */
    .text
    .globl _start
_start:
    mov $3, %ebx
1:  call outer
    dec %ebx
    jnz 1b
    mov $1, %eax
    mov $1, %edi
    lea msg(%rip), %rsi
    mov $6, %edx
    syscall
    mov $231, %eax
    xor %edi, %edi
    syscall

    .globl outer
outer:
    push %rbp
    mov %rsp, %rbp
    call middle
    call middle
    pop %rbp
    ret

    .globl middle
middle:
    mov $4, %ecx
1:  call inner
    dec %ecx
    jnz 1b
    ret

    .globl inner
inner:
    lea 1(%rax), %rax
    test $1, %al
    je 2f
    add $2, %rax
2:  ret

    .section .rodata
msg: .ascii "calls\n"
    .section .note.GNU-stack, "", @progbits
