/* hv-forkexec-loop [N]: N times (default 3: each one costs about a second
 * in the emulated guest) fork, execve("/bin/true") in the child and waitpid
 * in the parent; prints the elapsed time of each iteration. */
#define _GNU_SOURCE
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hv-common.h"

extern char **environ;

int main(int argc, char **argv)
{
    hv_init_stdio();
    if (argc > 2) {
        fprintf(stderr, "usage: hv-forkexec-loop [N]\n");
        return 2;
    }
    long n = hv_parse_count("hv-forkexec-loop", argc > 1 ? argv[1] : NULL, 3);
    long long total = 0;

    for (long i = 0; i < n; i++) {
        long long t0 = hv_now_ns();
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            char *args[] = {"true", NULL};
            execve("/bin/true", args, environ);
            _exit(127); /* exec failed */
        }
        int status;
        if (waitpid(pid, &status, 0) != pid) {
            perror("waitpid");
            return 1;
        }
        long long dt = hv_now_ns() - t0;
        total += dt;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("iteration %ld: child %d failed (status 0x%x)\n", i + 1, (int)pid, status);
            return 1;
        }
        printf("iteration %ld: fork+execve(/bin/true)+waitpid %lld ns\n", i + 1, dt);
    }
    printf("forkexec x %ld done, %lld ns per iteration\n", n, total / n);
    return 0;
}
