/* hv-sleeper [SECONDS]: print the pid, block in the nanosleep system call
 * (SYS_nanosleep itself: glibc's nanosleep() would use clock_nanosleep) for
 * SECONDS (default 30, fractions allowed; restarted after EINTR with the
 * time remaining), print "woke".
 * hv-sleeper --read: print the pid, then block forever in read(0) on the
 * read end of a pipe it made (moved to fd 0) whose write end it keeps open
 * and never writes.  Both are meant to be found blocked by a tracer. */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <unistd.h>

#include "hv-common.h"

static int sleep_mode(double secs)
{
    printf("hv-sleeper: pid %d, sleeping %g s in nanosleep\n", (int)getpid(), secs);
    fflush(stdout);
    struct timespec req, rem;
    req.tv_sec = (time_t)secs;
    req.tv_nsec = (long)((secs - (double)req.tv_sec) * 1e9);
    if (req.tv_nsec > 999999999L)
        req.tv_nsec = 999999999L;
    while (syscall(SYS_nanosleep, &req, &rem) != 0) {
        if (errno != EINTR) {
            perror("nanosleep");
            return 1;
        }
        req = rem;
    }
    printf("woke\n");
    return 0;
}

static int read_mode(void)
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
    if (argc > 2) {
        fprintf(stderr, "usage: hv-sleeper [SECONDS | --read]\n");
        return 2;
    }
    if (argc == 2 && strcmp(argv[1], "--read") == 0)
        return read_mode();
    return sleep_mode(hv_parse_seconds("hv-sleeper", argc > 1 ? argv[1] : NULL, 30.0));
}
