/* hv-getpid-loop [N]: call getpid through syscall(SYS_getpid) N times
 * (default 1000) and report the mean cost per call.  Each call is a real
 * system call (glibc's getpid() wrapper is not used). */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>

#include "hv-common.h"

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

    long long t0 = hv_now_ns();
    for (long i = 0; i < n; i++) {
        if (syscall(SYS_getpid) != expect)
            bad++;
    }
    long long t1 = hv_now_ns();

    printf("getpid x %ld done\n", n);
    printf("pid %ld, %lld ns total, %lld ns per call\n", expect, t1 - t0, (t1 - t0) / n);
    if (bad) {
        printf("error: %ld calls returned a different pid\n", bad);
        return 1;
    }
    return 0;
}
