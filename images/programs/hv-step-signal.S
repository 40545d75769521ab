/* hv-step-signal: installs a SIGUSR1 handler (with its own restorer),
 * sends itself SIGUSR1 with kill(getpid(), SIGUSR1), and exits 0 once the
 * handler has run (3 if it has not).  No libc. */
    .text
    .globl _start
_start:
    sub $32, %rsp
    lea handler(%rip), %rax
    mov %rax, (%rsp)
    movq $0x04000000, 8(%rsp)       /* SA_RESTORER */
    lea restorer(%rip), %rax
    mov %rax, 16(%rsp)
    movq $0, 24(%rsp)
    mov $13, %eax                   /* rt_sigaction(SIGUSR1, &act, 0, 8) */
    mov $10, %edi
    mov %rsp, %rsi
    xor %edx, %edx
    mov $8, %r10d
    syscall
    mov $39, %eax                   /* getpid */
    syscall
    mov %eax, %edi
    mov $10, %esi
    mov $62, %eax                   /* kill(pid, SIGUSR1) */
    syscall
    mov $3, %edi
    cmpq $5, count(%rip)
    jne 1f
    xor %edi, %edi
1:  mov $231, %eax
    syscall

    .globl handler
handler:
    mov $5, %ecx
1:  incq count(%rip)
    dec %ecx
    jnz 1b
    ret

    .globl restorer
restorer:
    mov $15, %eax                   /* rt_sigreturn */
    syscall
    .bss
count: .quad 0
    .section .note.GNU-stack, "", @progbits
