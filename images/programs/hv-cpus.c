/* hv-cpus: print the number of online CPUs (sysconf), then start one thread
 * per CPU this process may run on, pin it there with sched_setaffinity, busy
 * loop a little, and check with sched_getcpu() where it ran.  Prints
 * "cpu K ran" for each CPU a thread verifiably ran on; exits 0 if every
 * pinned thread ran on its CPU. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include "hv-common.h"

#define MAXCPUS 64
#define SPIN 2000000L

struct job {
    int cpu;
    int ok;
    int seen_first, seen_last;
    char err[96];
};

static void *worker(void *arg)
{
    struct job *j = arg;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(j->cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        snprintf(j->err, sizeof j->err, "sched_setaffinity: %s", strerror(errno));
        return NULL;
    }
    j->seen_first = sched_getcpu();
    volatile unsigned long x = 0;
    for (long i = 0; i < SPIN; i++)
        x += (unsigned long)i;
    j->seen_last = sched_getcpu();
    j->ok = j->seen_first == j->cpu && j->seen_last == j->cpu;
    return NULL;
}

int main(void)
{
    hv_init_stdio();
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    printf("online cpus: %ld\n", online);

    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) {
        perror("sched_getaffinity");
        return 1;
    }
    struct job jobs[MAXCPUS];
    pthread_t th[MAXCPUS];
    int n = 0;
    for (int c = 0; c < MAXCPUS && c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &allowed))
            continue;
        jobs[n] = (struct job){.cpu = c, .seen_first = -1, .seen_last = -1};
        n++;
    }
    printf("allowed cpus: %d\n", n);
    for (int i = 0; i < n; i++) {
        int rc = pthread_create(&th[i], NULL, worker, &jobs[i]);
        if (rc != 0) {
            printf("pthread_create: %s\n", strerror(rc));
            return 1;
        }
    }
    int ran = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        if (jobs[i].ok) {
            printf("cpu %d ran\n", jobs[i].cpu);
            ran++;
        } else if (jobs[i].err[0]) {
            printf("cpu %d: %s\n", jobs[i].cpu, jobs[i].err);
        } else {
            printf("cpu %d: thread ran on cpu %d then %d\n", jobs[i].cpu, jobs[i].seen_first,
                   jobs[i].seen_last);
        }
    }
    printf("cpus done: %d of %d pinned threads ran on their cpu\n", ran, n);
    return ran == n && n > 0 ? 0 : 1;
}
