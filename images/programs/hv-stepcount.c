/* hv-stepcount: the oracle of hvtrace's stepping tests.  Runs PROGRAM under
 * the guest kernel's own ptrace and steps it to its end with
 * PTRACE_SINGLESTEP ("step") or PTRACE_SINGLEBLOCK ("block"), counting the
 * SIGTRAP stops after the exec stop, by si_code:
 *   trace  TRAP_TRACE  the hardware's step (or branch) trap after an instruction
 *   brkpt  TRAP_BRKPT  a step over a system call, reported at its return
 *   notify SIGTRAP     entry to a signal handler (ptrace_notify)
 * Other signals are passed on to the program.  With -v, prints the program
 * counter at the exec stop ("exec ADDR") and at every stop ("trace ADDR",
 * "brkpt ADDR", "notify ADDR"), then one line:
 *   "stops N trace T brkpt B notify S other O signals G status X"
 * usage: hv-stepcount step|block [-v] PROGRAM [ARGS...] */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef PTRACE_SINGLEBLOCK
#define PTRACE_SINGLEBLOCK 33
#endif

static void print_pc(pid_t pid, const char *kind)
{
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0)
        printf("%s ?\n", kind);
    else
        printf("%s %#llx\n", kind, regs.rip);
}

int main(int argc, char **argv)
{
    if (argc < 3 || (strcmp(argv[1], "step") != 0 && strcmp(argv[1], "block") != 0)) {
        fprintf(stderr, "usage: hv-stepcount step|block PROGRAM [ARGS...]\n");
        return 2;
    }
    int request = strcmp(argv[1], "block") == 0 ? PTRACE_SINGLEBLOCK : PTRACE_SINGLESTEP;
    int verbose = strcmp(argv[2], "-v") == 0;
    if (verbose) {
        argv++;
        if (argc < 4) {
            fprintf(stderr, "usage: hv-stepcount step|block [-v] PROGRAM [ARGS...]\n");
            return 2;
        }
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("hv-stepcount: fork");
        return 1;
    }
    if (pid == 0) {
        if (ptrace(PTRACE_TRACEME, 0, 0, 0) < 0) {
            perror("hv-stepcount: PTRACE_TRACEME");
            _exit(126);
        }
        execv(argv[2], argv + 2);
        perror("hv-stepcount: exec");
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFSTOPPED(status) || WSTOPSIG(status) != SIGTRAP) {
        fprintf(stderr, "hv-stepcount: no exec stop (status %#x)\n", status);
        return 1;
    }
    if (verbose)
        print_pc(pid, "exec");
    long stops = 0, trace = 0, brkpt = 0, notify = 0, other = 0, signals = 0;
    int sig = 0;
    for (;;) {
        if (ptrace(request, pid, 0, (void *)(long)sig) < 0) {
            fprintf(stderr, "hv-stepcount: %s: %s\n", argv[1], strerror(errno));
            return 1;
        }
        sig = 0;
        if (waitpid(pid, &status, 0) < 0) {
            perror("hv-stepcount: waitpid");
            return 1;
        }
        if (WIFEXITED(status) || WIFSIGNALED(status))
            break;
        if (WSTOPSIG(status) != SIGTRAP) {
            sig = WSTOPSIG(status);
            signals++;
            continue;
        }
        siginfo_t si;
        memset(&si, 0, sizeof si);
        ptrace(PTRACE_GETSIGINFO, pid, 0, &si);
        stops++;
        const char *kind = "other";
        if (si.si_code == TRAP_TRACE) {
            trace++;
            kind = "trace";
        } else if (si.si_code == TRAP_BRKPT) {
            brkpt++;
            kind = "brkpt";
        } else if (si.si_code == SIGTRAP) {
            notify++;
            kind = "notify";
        } else {
            other++;
        }
        if (verbose)
            print_pc(pid, kind);
    }
    printf("stops %ld trace %ld brkpt %ld notify %ld other %ld signals %ld status %d\n", stops,
           trace, brkpt, notify, other, signals,
           WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return 0;
}
