/* hv-procs: populate the guest with processes and threads in known states,
 * print what the guest's own /proc says about every task, then block in a
 * known system call so that a tracer outside can compare.
 *
 *   hv-procs [CHILDREN [THREADS]]     (defaults 20 and 10)
 *
 * Children: all but two sleep in pause() (state S); one is stopped by
 * SIGSTOP (T); one exits at once and is never reaped (Z). THREADS threads of
 * this process sleep in read() on a pipe nobody writes. When every task has
 * reached its state, it prints
 *
 *   exe: <readlink /proc/self/exe>
 *   task <pid> <tid> <ppid> <state> <comm>      one per task in /proc
 *   hv-procs: ready <pid> <read fd> <read count>
 *
 * and then its main thread blocks in read(<read fd>, buf, <read count>)
 * until SIGALRM (after 600 s) or a kill. Children die with it (PDEATHSIG). */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hv-common.h"

#define READ_COUNT 4242
#define MAX_TASKS 4096

static int pipe_fds[2];

static void *sleeper(void *arg)
{
    char name[16];
    snprintf(name, sizeof name, "hv-thr-%ld", (long)(size_t)arg);
    prctl(PR_SET_NAME, name);
    char buf[8];
    for (;;)
        if (read(pipe_fds[0], buf, sizeof buf) <= 0 && errno != EINTR)
            pause();
    return NULL;
}

/* The state letter and ppid of /proc/<pid>/task/<tid>/stat; 0 if unreadable. */
static char task_state(int pid, int tid, int *ppid, char *comm, size_t comm_len)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *open_paren = strchr(buf, '(');
    char *close_paren = strrchr(buf, ')');
    if (!open_paren || !close_paren || close_paren[1] == '\0')
        return 0;
    if (comm) {
        size_t len = (size_t)(close_paren - open_paren - 1);
        if (len >= comm_len)
            len = comm_len - 1;
        memcpy(comm, open_paren + 1, len);
        comm[len] = '\0';
    }
    char state = close_paren[2];
    if (ppid)
        *ppid = atoi(close_paren + 4);
    return state;
}

/* Waits until task tid of pid is in `want` (up to 60 s); 1 on success. */
static int wait_state(int pid, int tid, char want)
{
    for (int i = 0; i < 6000; i++) {
        if (task_state(pid, tid, NULL, NULL, 0) == want)
            return 1;
        usleep(10000);
    }
    fprintf(stderr, "hv-procs: task %d/%d never reached state %c\n", pid, tid, want);
    return 0;
}

static int is_number(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    hv_init_stdio();
    long children = hv_parse_count("hv-procs", argc > 1 ? argv[1] : NULL, 20);
    long threads = hv_parse_count("hv-procs", argc > 2 ? argv[2] : NULL, 10);
    if (children < 2 || children > 1000 || threads > 1000) {
        fprintf(stderr, "hv-procs: want 2..1000 children and at most 1000 threads\n");
        return 2;
    }
    if (pipe(pipe_fds) != 0) {
        perror("pipe");
        return 1;
    }
    int me = getpid();
    pid_t kids[1000];
    for (long i = 0; i < children; i++) {
        pid_t p = fork();
        if (p < 0) {
            perror("fork");
            return 1;
        }
        if (p == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != me)
                _exit(1);
            char name[16];
            snprintf(name, sizeof name, "hv-child-%ld", i);
            prctl(PR_SET_NAME, name);
            if (i == 1)
                _exit(7); /* becomes a zombie: never reaped */
            for (;;)
                pause();
        }
        kids[i] = p;
    }
    kill(kids[0], SIGSTOP);
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (long i = 0; i < threads; i++) {
        int rc = pthread_create(&th, &attr, sleeper, (void *)(size_t)i);
        if (rc != 0) {
            fprintf(stderr, "hv-procs: pthread_create: %s\n", strerror(rc));
            return 1;
        }
    }
    int ok = wait_state(kids[0], kids[0], 'T') && wait_state(kids[1], kids[1], 'Z');
    for (long i = 2; ok && i < children; i++)
        ok = wait_state(kids[i], kids[i], 'S');
    /* Our own threads: every task of ours but the main thread must sleep. */
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (ok && d && (e = readdir(d)) != NULL)
        if (is_number(e->d_name) && atoi(e->d_name) != me)
            ok = wait_state(me, atoi(e->d_name), 'S');
    if (d)
        closedir(d);
    if (!ok)
        return 1;

    char exe[256];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = '\0';
    printf("exe: %s\n", exe);

    DIR *proc = opendir("/proc");
    if (!proc) {
        perror("/proc");
        return 1;
    }
    int listed = 0;
    while ((e = readdir(proc)) != NULL && listed < MAX_TASKS) {
        if (!is_number(e->d_name))
            continue;
        int pid = atoi(e->d_name);
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", pid);
        DIR *tasks = opendir(path);
        if (!tasks)
            continue; /* exited meanwhile */
        struct dirent *t;
        while ((t = readdir(tasks)) != NULL && listed < MAX_TASKS) {
            if (!is_number(t->d_name))
                continue;
            int tid = atoi(t->d_name), ppid = 0;
            char comm[64];
            char state = task_state(pid, tid, &ppid, comm, sizeof comm);
            if (state) {
                printf("task %d %d %d %c %s\n", pid, tid, ppid, state, comm);
                listed++;
            }
        }
        closedir(tasks);
    }
    closedir(proc);
    printf("hv-procs: ready %d %d %d\n", me, pipe_fds[0], READ_COUNT);
    alarm(600);
    static char buf[READ_COUNT];
    ssize_t r = read(pipe_fds[0], buf, READ_COUNT);
    return r < 0 ? 1 : 0;
}
