/*
 * hv-gdb-demo: a program to debug (hvtrace gdbserver's tests), built with
 * debug information and no optimisation, as a developer builds what they
 * debug. The same binary runs under gdb natively on the host (the
 * reference) and in the guest under `hvtrace gdbserver`.
 *
 *   hv-gdb-demo           three rounds of scale(), each printed; exits 7
 *   hv-gdb-demo threads N N threads start and wait; the main thread
 *                         prints the thread ids its /proc/self/task lists,
 *                         calls checkpoint(), then lets them finish; each
 *                         prints its worker() result; exits 0
 *   hv-gdb-demo segv      stores through a null pointer (SIGSEGV)
 *   hv-gdb-demo usr1      waits for SIGUSR1 (handled: prints it), exits 0
 *   hv-gdb-demo spin      loops until `stop` is set to 1 (by a debugger)
 */
#include <dirent.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int total;
static volatile int stop;
static pthread_barrier_t ready, go;

int scale(int value, int factor)
{
	int product = value * factor;
	int result = product + 1;
	return result;
}

static void accumulate(int round)
{
	int r = scale(round + 10, 3);
	total += r;
	printf("round %d: scale=%d total=%d\n", round, r, total);
}

static void *worker(void *arg)
{
	long n = (long)arg;
	pthread_barrier_wait(&ready);
	pthread_barrier_wait(&go);
	printf("worker %ld: %d\n", n, scale((int)n, 100));
	return NULL;
}

/* Where a debugger stops with every thread alive. */
void checkpoint(void)
{
	printf("checkpoint\n");
}

/* Prints the thread ids in /proc/self/task (the guest kernel's view). */
static void print_tasks(void)
{
	DIR *d = opendir("/proc/self/task");
	struct dirent *e;
	if (!d)
		return;
	printf("tasks:");
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			printf(" %s", e->d_name);
	printf("\n");
	closedir(d);
}

static int threads(int n)
{
	pthread_t t[16];
	if (n < 1 || n > 16)
		return 2;
	pthread_barrier_init(&ready, NULL, (unsigned)n + 1);
	pthread_barrier_init(&go, NULL, (unsigned)n + 1);
	for (long i = 0; i < n; i++)
		pthread_create(&t[i], NULL, worker, (void *)i);
	pthread_barrier_wait(&ready);
	print_tasks();
	checkpoint();
	pthread_barrier_wait(&go);
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	return 0;
}

static volatile sig_atomic_t got;

static void on_usr1(int sig)
{
	got = sig;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IONBF, 0);
	if (argc > 2 && strcmp(argv[1], "threads") == 0)
		return threads(atoi(argv[2]));
	if (argc > 1 && strcmp(argv[1], "segv") == 0) {
		int *volatile p = NULL;
		*p = 42;
		return 1;
	}
	if (argc > 1 && strcmp(argv[1], "usr1") == 0) {
		signal(SIGUSR1, on_usr1);
		while (!got)
			pause();
		printf("got signal %d\n", (int)got);
		return 0;
	}
	if (argc > 1 && strcmp(argv[1], "spin") == 0) {
		while (!stop)
			;
		printf("stopped spinning\n");
		return 0;
	}
	for (int round = 0; round < 3; round++)
		accumulate(round);
	printf("done: total=%d\n", total);
	return 7;
}
