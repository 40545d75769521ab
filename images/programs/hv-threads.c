/* hv-threads: start 3 pthreads; thread k (1..3) prints its tid (gettid),
 * sums k*i for i = 1..100000 and returns the sum; main joins them and
 * prints the per-thread and grand totals (deterministic: 5000050000 * k,
 * 30000300000 in all).  The threads' own lines may appear in any order. */
#define _GNU_SOURCE
#include <pthread.h>
#include <unistd.h>

#include "hv-common.h"

#define NTHREADS 3
#define LOOP 100000LL

struct job {
    int k;
    pid_t tid;
    long long sum;
};

static void *worker(void *arg)
{
    struct job *j = arg;
    j->tid = gettid();
    printf("thread %d: tid %d\n", j->k, (int)j->tid);
    volatile long long sum = 0; /* volatile: keep the loop a real loop */
    for (long long i = 1; i <= LOOP; i++)
        sum += (long long)j->k * i;
    j->sum = sum;
    return NULL;
}

int main(void)
{
    hv_init_stdio();
    pthread_t th[NTHREADS];
    struct job jobs[NTHREADS];

    printf("main: pid %d tid %d, starting %d threads\n", (int)getpid(), (int)gettid(), NTHREADS);
    for (int k = 0; k < NTHREADS; k++) {
        jobs[k] = (struct job){.k = k + 1};
        int rc = pthread_create(&th[k], NULL, worker, &jobs[k]);
        if (rc != 0) {
            printf("pthread_create: %s\n", strerror(rc));
            return 1;
        }
    }
    long long total = 0;
    int ok = 1;
    for (int k = 0; k < NTHREADS; k++) {
        int rc = pthread_join(th[k], NULL);
        if (rc != 0) {
            printf("pthread_join: %s\n", strerror(rc));
            return 1;
        }
        long long want = (long long)jobs[k].k * LOOP * (LOOP + 1) / 2;
        printf("joined thread %d (tid %d): sum %lld\n", jobs[k].k, (int)jobs[k].tid, jobs[k].sum);
        if (jobs[k].sum != want)
            ok = 0;
        total += jobs[k].sum;
    }
    printf("threads done: total %lld\n", total);
    return ok ? 0 : 1;
}
