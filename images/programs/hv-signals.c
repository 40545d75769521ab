/* hv-signals: a fixed sequence of signal operations, each step printed.
 *  1. sigaction(SIGUSR1) installs a handler;
 *  2. kill(getpid(), SIGUSR1) runs it;
 *  3. sigprocmask(SIG_BLOCK, SIGUSR1), kill again: the signal stays pending;
 *     sigprocmask(SIG_UNBLOCK) delivers it;
 *  4. with SIGCHLD blocked and handled, fork a child that _exit(7)s, waitpid
 *     it, see SIGCHLD pending, unblock: the handler runs. */
#define _GNU_SOURCE
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hv-common.h"

static volatile sig_atomic_t usr1_count;
static volatile sig_atomic_t chld_count;

static void on_usr1(int sig)
{
    (void)sig;
    usr1_count++;
}

static void on_chld(int sig)
{
    (void)sig;
    chld_count++;
}

static int fail(const char *what)
{
    printf("FAILED: %s\n", what);
    return 1;
}

int main(void)
{
    hv_init_stdio();
    struct sigaction sa;
    sigset_t set, pending;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        return fail("sigaction(SIGUSR1)");
    printf("step 1: installed SIGUSR1 handler\n");

    if (kill(getpid(), SIGUSR1) != 0)
        return fail("kill(SIGUSR1)");
    if (usr1_count != 1)
        return fail("SIGUSR1 handler did not run");
    printf("step 2: kill(getpid(), SIGUSR1) ran the handler (count %d)\n", (int)usr1_count);

    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
        return fail("sigprocmask(SIG_BLOCK)");
    if (kill(getpid(), SIGUSR1) != 0)
        return fail("kill(SIGUSR1) while blocked");
    if (sigpending(&pending) != 0 || !sigismember(&pending, SIGUSR1) || usr1_count != 1)
        return fail("blocked SIGUSR1 not pending");
    printf("step 3: SIGUSR1 blocked, sent, pending (count %d)\n", (int)usr1_count);
    if (sigprocmask(SIG_UNBLOCK, &set, NULL) != 0)
        return fail("sigprocmask(SIG_UNBLOCK)");
    if (usr1_count != 2)
        return fail("SIGUSR1 not delivered on unblock");
    printf("step 3: unblocked, SIGUSR1 delivered (count %d)\n", (int)usr1_count);

    sa.sa_handler = on_chld;
    if (sigaction(SIGCHLD, &sa, NULL) != 0)
        return fail("sigaction(SIGCHLD)");
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
        return fail("sigprocmask(SIG_BLOCK SIGCHLD)");
    pid_t pid = fork();
    if (pid < 0)
        return fail("fork");
    if (pid == 0)
        _exit(7);
    int status;
    if (waitpid(pid, &status, 0) != pid)
        return fail("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 7)
        return fail("child exit status");
    printf("step 4: child %d exited with status %d\n", (int)pid, WEXITSTATUS(status));
    if (sigpending(&pending) != 0 || !sigismember(&pending, SIGCHLD) || chld_count != 0)
        return fail("SIGCHLD not pending while blocked");
    printf("step 4: SIGCHLD pending while blocked\n");
    if (sigprocmask(SIG_UNBLOCK, &set, NULL) != 0)
        return fail("sigprocmask(SIG_UNBLOCK SIGCHLD)");
    if (chld_count != 1)
        return fail("SIGCHLD handler did not run");
    printf("step 4: unblocked, SIGCHLD delivered (count %d)\n", (int)chld_count);
    printf("signals done\n");
    return 0;
}
