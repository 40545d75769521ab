/* hv-counters [SECONDS]: two threads that only count, in user mode, and a
 * main thread that reports their counts.
 *
 * Prints "hv-counters: pid P worker W sibling S" (the threads' ids), then
 * every 200 ms "tick N ms M worker A sibling B": M milliseconds since the
 * start, A and B the two counters.  Stops after SECONDS (default 30) and
 * prints "done".  Made to be held stopped from outside: a stopped worker's
 * count stays put while its sibling's keeps rising. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#include "hv-common.h"

static atomic_llong counts[2];
static atomic_int tids[2];

static void *counter(void *arg)
{
    int k = (int)(long)arg;
    atomic_store(&tids[k], (int)gettid());
    for (;;)
        atomic_fetch_add_explicit(&counts[k], 1, memory_order_relaxed);
    return NULL;
}

int main(int argc, char **argv)
{
    hv_init_stdio();
    if (argc > 2) {
        fprintf(stderr, "usage: hv-counters [SECONDS]\n");
        return 2;
    }
    double secs = hv_parse_seconds("hv-counters", argc > 1 ? argv[1] : NULL, 30.0);
    pthread_t th[2];
    for (long k = 0; k < 2; k++) {
        if (pthread_create(&th[k], NULL, counter, (void *)k) != 0) {
            printf("pthread_create failed\n");
            return 1;
        }
    }
    while (atomic_load(&tids[0]) == 0 || atomic_load(&tids[1]) == 0)
        usleep(1000);
    printf("hv-counters: pid %d worker %d sibling %d\n", (int)getpid(), atomic_load(&tids[0]),
           atomic_load(&tids[1]));
    long long t0 = hv_now_ns();
    for (long n = 1;; n++) {
        struct timespec d = {0, 200 * 1000 * 1000};
        while (nanosleep(&d, &d) != 0 && errno == EINTR)
            ;
        long long ms = (hv_now_ns() - t0) / 1000000;
        printf("tick %ld ms %lld worker %lld sibling %lld\n", n, ms,
               (long long)atomic_load_explicit(&counts[0], memory_order_relaxed),
               (long long)atomic_load_explicit(&counts[1], memory_order_relaxed));
        if (ms >= (long long)(secs * 1000))
            break;
    }
    printf("done\n");
    return 0;
}
