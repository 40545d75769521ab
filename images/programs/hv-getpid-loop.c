/* hv-getpid-loop [N]: call getpid through syscall(SYS_getpid) N times
 * (default 1000) and report the mean cost per call.  Each call is a real
 * system call (glibc's getpid() wrapper is not used).  SIGUSR1 ends the
 * loop early: "getpid x M done" then counts the M calls made, so a test
 * can keep a loop running for as long as it needs on a guest of any
 * speed. */
#define _GNU_SOURCE
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hv-common.h"

static volatile sig_atomic_t stop;

static void on_usr1(int sig)
{
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv)
{
    hv_init_stdio();
    if (argc > 2) {
        fprintf(stderr, "usage: hv-getpid-loop [N]\n");
        return 2;
    }
    long n = hv_parse_count("hv-getpid-loop", argc > 1 ? argv[1] : NULL, 1000);
    long expect = syscall(SYS_getpid);
    long bad = 0;

    signal(SIGUSR1, on_usr1);

    long long t0 = hv_now_ns();
    long i;
    for (i = 0; i < n && !stop; i++) {
        if (syscall(SYS_getpid) != expect)
            bad++;
    }
    n = i > 0 ? i : 1;
    long long t1 = hv_now_ns();

    printf("getpid x %ld done\n", i);
    printf("pid %ld, %lld ns total, %lld ns per call\n", expect, t1 - t0, (t1 - t0) / n);
    if (bad) {
        printf("error: %ld calls returned a different pid\n", bad);
        return 1;
    }
    return 0;
}
