/* hv-spin [SECONDS]: busy loop in user mode for SECONDS (default 1,
 * fractions allowed), reading CLOCK_MONOTONIC (vDSO: no system call where
 * the clock source allows) every iteration; prints the iteration count. */
#define _GNU_SOURCE
#include <unistd.h>

#include "hv-common.h"

int main(int argc, char **argv)
{
    hv_init_stdio();
    if (argc > 2) {
        fprintf(stderr, "usage: hv-spin [SECONDS]\n");
        return 2;
    }
    double secs = hv_parse_seconds("hv-spin", argc > 1 ? argv[1] : NULL, 1.0);
    printf("hv-spin: pid %d, spinning %g s\n", (int)getpid(), secs);
    long long start = hv_now_ns();
    long long end = start + (long long)(secs * 1e9);
    unsigned long long iters = 0;
    long long now;
    do {
        iters++;
        now = hv_now_ns();
    } while (now < end);
    printf("spin done: %llu iterations in %lld ns\n", iters, now - start);
    return 0;
}
