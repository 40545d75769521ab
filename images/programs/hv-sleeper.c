/* hv-sleeper [SECONDS]: print the pid, block in the nanosleep system call
 * (SYS_nanosleep itself: glibc's nanosleep() would use clock_nanosleep) for
 * SECONDS (default 30, fractions allowed; restarted after EINTR with the
 * time remaining, printing "nanosleep: EINTR"), print "woke after S s"
 * (the time it slept in all).
 * hv-sleeper --read [SECONDS]: print the pid, then block in read(0) on the
 * read end of a pipe it made (moved to fd 0) whose write end it keeps
 * open; with SECONDS, a thread writes one byte into the pipe after that
 * long, and the read's result is printed ("read returned 1", or the error).
 * Without, nobody writes: it blocks forever.  Both are meant to be found
 * blocked by a tracer. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hv-common.h"

static int sleep_mode(double secs)
{
    printf("hv-sleeper: pid %d, sleeping %g s in nanosleep\n", (int)getpid(), secs);
    fflush(stdout);
    struct timespec req, rem;
    long long t0 = hv_now_ns();
    req.tv_sec = (time_t)secs;
    req.tv_nsec = (long)((secs - (double)req.tv_sec) * 1e9);
    if (req.tv_nsec > 999999999L)
        req.tv_nsec = 999999999L;
    while (syscall(SYS_nanosleep, &req, &rem) != 0) {
        if (errno != EINTR) {
            perror("nanosleep");
            return 1;
        }
        printf("nanosleep: EINTR\n");
        req = rem;
    }
    printf("woke after %.2f s\n", (double)(hv_now_ns() - t0) / 1e9);
    return 0;
}

static int writer_fd = -1;
static double writer_delay;

static void *writer(void *arg)
{
    (void)arg;
    struct timespec d = {(time_t)writer_delay,
                         (long)((writer_delay - (double)(time_t)writer_delay) * 1e9)};
    while (nanosleep(&d, &d) != 0 && errno == EINTR)
        ;
    if (write(writer_fd, "x", 1) != 1)
        perror("write");
    return NULL;
}

static int read_mode(double write_after)
{
    int p[2];
    if (pipe(p) != 0) {
        perror("pipe");
        return 1;
    }
    if (dup2(p[0], STDIN_FILENO) < 0) {
        perror("dup2");
        return 1;
    }
    close(p[0]);
    printf("hv-sleeper: pid %d, blocking in read(0) on a pipe\n", (int)getpid());
    fflush(stdout);
    if (write_after > 0) {
        writer_fd = p[1];
        writer_delay = write_after;
        pthread_t t;
        if (pthread_create(&t, NULL, writer, NULL) != 0) {
            printf("pthread_create failed\n");
            return 1;
        }
    }
    char c;
    ssize_t n = read(STDIN_FILENO, &c, 1); /* p[1] stays open: blocks */
    if (n < 0) {
        printf("read: %s\n", strerror(errno));
        return 1;
    }
    printf("read returned %zd\n", n);
    return 0;
}

int main(int argc, char **argv)
{
    hv_init_stdio();
    if (argc > 3 || (argc == 3 && strcmp(argv[1], "--read") != 0)) {
        fprintf(stderr, "usage: hv-sleeper [SECONDS | --read [SECONDS]]\n");
        return 2;
    }
    if (argc >= 2 && strcmp(argv[1], "--read") == 0)
        return read_mode(argc == 3 ? hv_parse_seconds("hv-sleeper", argv[2], 0) : 0);
    return sleep_mode(hv_parse_seconds("hv-sleeper", argc > 1 ? argv[1] : NULL, 30.0));
}
