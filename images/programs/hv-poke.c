/* hv-poke [SECONDS]: a target for register and memory writes from outside.
 *
 * Prints "hv-poke: pid P value V hijack H message M": the addresses of an
 * int variable (42 at start), of a function that prints "P hijacked" and
 * exits 7 (it runs only if something outside points the program at it),
 * and of a string constant in read-only data ("original message").  Then
 * every 200 ms "P value N message S": what it finds there now.  Stops after
 * SECONDS (default 30) with "P done". */
#define _GNU_SOURCE
#include <unistd.h>

#include "hv-common.h"

static volatile int value = 42;
static const char message[] = "original message";

__attribute__((noinline, used)) static void hijacked(void)
{
    printf("%d hijacked\n", (int)getpid());
    exit(7);
}

int main(int argc, char **argv)
{
    hv_init_stdio();
    if (argc > 2) {
        fprintf(stderr, "usage: hv-poke [SECONDS]\n");
        return 2;
    }
    double secs = hv_parse_seconds("hv-poke", argc > 1 ? argv[1] : NULL, 30.0);
    /* Read through a volatile pointer: the compiler must not assume the
     * constant's bytes. */
    const char *volatile text = message;
    printf("hv-poke: pid %d value %p hijack %p message %p\n", (int)getpid(), (void *)&value,
           (void *)hijacked, (void *)message);
    long long t0 = hv_now_ns();
    while ((hv_now_ns() - t0) / 1e9 < secs) {
        struct timespec d = {0, 200 * 1000 * 1000};
        while (nanosleep(&d, &d) != 0 && errno == EINTR)
            ;
        printf("%d value %d message %s\n", (int)getpid(), value, text);
    }
    printf("%d done\n", (int)getpid());
    return 0;
}
