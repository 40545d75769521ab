/* hv-vector-regs [PROCS] [ROUNDS] [SIGNAL-MS]: checks that the guest kernel keeps every
 * task's vector registers across context switches and signal handlers.
 *
 * PROCS processes (default 4) each load xmm0-15, and the whole of ymm0-15
 * where the CPU has AVX, with a pattern of their own; then ROUNDS times
 * (default 400) spin in user mode, call sched_yield, and store the
 * registers back for a comparison, all inside one asm statement so that no
 * compiler-generated code touches them in between. A SIGALRM every
 * SIGNAL-MS milliseconds (default 50; 0: none) runs a handler that loads other values into every register, so the
 * signal frame's save and restore are checked too. Prints one line per
 * process and exits 0 only if every register of every process held. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hv-common.h"

#define NREGS 16

static unsigned char clobber[NREGS * 32] __attribute__((aligned(32)));

/* Whether the CPU has AVX and the OS enabled the YMM state (CPUID and
 * XGETBV, as glibc decides). */
static int have_avx(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (!(c & bit_AVX) || !(c & bit_OSXSAVE))
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 6) == 6;
}

static int avx;

#define LOAD16(insn, base)                                                    \
    insn " 0*32(" base "), %%" R "0\n\t" insn " 1*32(" base "), %%" R "1\n\t"     \
    insn " 2*32(" base "), %%" R "2\n\t" insn " 3*32(" base "), %%" R "3\n\t"     \
    insn " 4*32(" base "), %%" R "4\n\t" insn " 5*32(" base "), %%" R "5\n\t"     \
    insn " 6*32(" base "), %%" R "6\n\t" insn " 7*32(" base "), %%" R "7\n\t"     \
    insn " 8*32(" base "), %%" R "8\n\t" insn " 9*32(" base "), %%" R "9\n\t"     \
    insn " 10*32(" base "), %%" R "10\n\t" insn " 11*32(" base "), %%" R "11\n\t" \
    insn " 12*32(" base "), %%" R "12\n\t" insn " 13*32(" base "), %%" R "13\n\t" \
    insn " 14*32(" base "), %%" R "14\n\t" insn " 15*32(" base "), %%" R "15\n\t"
#define STORE16(insn, base)                                                    \
    insn " %%" R "0, 0*32(" base ")\n\t" insn " %%" R "1, 1*32(" base ")\n\t"     \
    insn " %%" R "2, 2*32(" base ")\n\t" insn " %%" R "3, 3*32(" base ")\n\t"     \
    insn " %%" R "4, 4*32(" base ")\n\t" insn " %%" R "5, 5*32(" base ")\n\t"     \
    insn " %%" R "6, 6*32(" base ")\n\t" insn " %%" R "7, 7*32(" base ")\n\t"     \
    insn " %%" R "8, 8*32(" base ")\n\t" insn " %%" R "9, 9*32(" base ")\n\t"     \
    insn " %%" R "10, 10*32(" base ")\n\t" insn " %%" R "11, 11*32(" base ")\n\t" \
    insn " %%" R "12, 12*32(" base ")\n\t" insn " %%" R "13, 13*32(" base ")\n\t" \
    insn " %%" R "14, 14*32(" base ")\n\t" insn " %%" R "15, 15*32(" base ")\n\t"

#define VCLOBBERS                                                              \
    "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",    \
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

/* Loads every register from `in`, spins `spin` iterations, yields, and
 * stores every register to `out`. */
__attribute__((target("avx"))) static void round_ymm(const void *in, void *out, long spin)
{
#define R "ymm"
    __asm__ volatile(LOAD16("vmovdqu", "%2")
                     "1: dec %1\n\t"
                     "jnz 1b\n\t"
                     "mov $24, %%eax\n\t" /* sched_yield */
                     "syscall\n\t"
                     STORE16("vmovdqu", "%0")
                     : "+r"(out), "+r"(spin)
                     : "r"(in)
                     : "rax", "rcx", "r11", "memory", "cc", VCLOBBERS);
#undef R
}

static void round_xmm(const void *in, void *out, long spin)
{
#define R "xmm"
    __asm__ volatile(LOAD16("movdqu", "%2")
                     "1: dec %1\n\t"
                     "jnz 1b\n\t"
                     "mov $24, %%eax\n\t"
                     "syscall\n\t"
                     STORE16("movdqu", "%0")
                     : "+r"(out), "+r"(spin)
                     : "r"(in)
                     : "rax", "rcx", "r11", "memory", "cc", VCLOBBERS);
#undef R
}

__attribute__((target("avx"))) static void clobber_ymm(void)
{
#define R "ymm"
    __asm__ volatile(LOAD16("vmovdqu", "%0") : : "r"(clobber) : "memory", VCLOBBERS);
#undef R
}

static void clobber_xmm(void)
{
#define R "xmm"
    __asm__ volatile(LOAD16("movdqu", "%0") : : "r"(clobber) : "memory", VCLOBBERS);
#undef R
}

static volatile sig_atomic_t alarms;

static void on_alarm(int sig)
{
    (void)sig;
    alarms++;
    if (avx)
        clobber_ymm();
    else
        clobber_xmm();
}

/* One process's check; returns the number of rounds with a changed register. */
static long check(long rounds)
{
    unsigned char pattern[NREGS * 32] __attribute__((aligned(32)));
    unsigned char got[NREGS * 32] __attribute__((aligned(32)));
    unsigned seed = (unsigned)getpid() * 2654435761u;
    for (size_t i = 0; i < sizeof pattern; i++) {
        seed = seed * 1103515245u + 12345u;
        pattern[i] = (unsigned char)(seed >> 16) | 1; /* never 0: zeros are what a lost state reads */
    }
    size_t width = avx ? 32 : 16;
    long bad = 0;
    for (long r = 0; r < rounds; r++) {
        memset(got, 0, sizeof got);
        if (avx)
            round_ymm(pattern, got, 20000);
        else
            round_xmm(pattern, got, 20000);
        for (int reg = 0; reg < NREGS; reg++) {
            if (memcmp(got + reg * 32, pattern + reg * 32, width) != 0) {
                int upper = memcmp(got + reg * 32, pattern + reg * 32, 16) == 0;
                if (bad == 0)
                    printf("process %d: round %ld: %s%d %s changed\n", (int)getpid(), r + 1,
                           avx ? "ymm" : "xmm", reg, upper ? "upper half" : "lower half");
                bad++;
                break;
            }
        }
    }
    return bad;
}

int main(int argc, char **argv)
{
    hv_init_stdio();
    if (argc > 4) {
        fprintf(stderr, "usage: hv-vector-regs [PROCS] [ROUNDS] [SIGNAL-MS]\n");
        return 2;
    }
    long procs = hv_parse_count("hv-vector-regs", argc > 1 ? argv[1] : NULL, 4);
    long rounds = hv_parse_count("hv-vector-regs", argc > 2 ? argv[2] : NULL, 400);
    /* Each signal costs milliseconds of emulated kernel work on PVM KVM: a
     * period shorter than that would leave no time for the rounds. */
    double signal_ms = hv_parse_seconds("hv-vector-regs", argc > 3 ? argv[3] : NULL, 50);
    avx = have_avx();
    memset(clobber, 0x5a, sizeof clobber);
    printf("checking %s0-15 in %ld processes, %ld rounds each\n", avx ? "ymm" : "xmm", procs, rounds);
    for (long p = 0; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            struct sigaction sa = {.sa_handler = on_alarm};
            sigemptyset(&sa.sa_mask);
            sa.sa_flags = SA_RESTART;
            sigaction(SIGALRM, &sa, NULL);
            long us = (long)(signal_ms * 1000);
            struct itimerval it = {{us / 1000000, us % 1000000}, {us / 1000000, us % 1000000}};
            if (us > 0)
                setitimer(ITIMER_REAL, &it, NULL);
            long bad = check(rounds);
            struct itimerval off = {{0, 0}, {0, 0}};
            setitimer(ITIMER_REAL, &off, NULL);
            printf("process %d: %ld of %ld rounds with a changed register (%d signals handled)\n",
                   (int)getpid(), bad, rounds, (int)alarms);
            _exit(bad == 0 ? 0 : 1);
        }
    }
    int failed = 0;
    for (long p = 0; p < procs; p++) {
        int status;
        if (wait(&status) < 0) {
            perror("wait");
            return 1;
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed++;
    }
    if (failed) {
        printf("vector registers changed in %d of %ld processes\n", failed, procs);
        return 1;
    }
    printf("vector registers intact in all %ld processes\n", procs);
    return 0;
}
