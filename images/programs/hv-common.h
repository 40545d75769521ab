/* Helpers shared by hvtrace's guest test programs (header-only, all static).
 *
 * Every program is built statically, makes stdout line buffered so that each
 * printed line is one write(2) whatever stdout is (tty, pipe or file), and
 * exits 0 only when everything it checked went as expected. */
#ifndef HV_COMMON_H
#define HV_COMMON_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline void hv_init_stdio(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);
}

static inline long long hv_now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        perror("clock_gettime");
        exit(1);
    }
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Parse a positive count argument; exits 2 on a malformed one. */
static inline long hv_parse_count(const char *prog, const char *arg, long dflt)
{
    if (arg == NULL)
        return dflt;
    char *end;
    errno = 0;
    long v = strtol(arg, &end, 10);
    if (errno != 0 || end == arg || *end != '\0' || v < 1) {
        fprintf(stderr, "%s: bad count '%s' (want an integer >= 1)\n", prog, arg);
        exit(2);
    }
    return v;
}

/* Parse a non-negative number of seconds (fractions allowed); exits 2 on a
 * malformed one. */
static inline double hv_parse_seconds(const char *prog, const char *arg, double dflt)
{
    if (arg == NULL)
        return dflt;
    char *end;
    errno = 0;
    double v = strtod(arg, &end);
    if (errno != 0 || end == arg || *end != '\0' || !(v >= 0.0) || v > 1e9) {
        fprintf(stderr, "%s: bad duration '%s' (want seconds >= 0)\n", prog, arg);
        exit(2);
    }
    return v;
}

#endif
