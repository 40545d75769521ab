/* hv-output DIR: the guest side of hvtrace's output window (the VMM side
 * and the register layout: vmm/src/devices/output_window.rs). Not a test
 * program: /init starts it once at boot.
 *
 * Through ttyS2/ttyS3 every byte a command writes costs an emulated UART
 * exit plus the tty layer and an interrupt per 16 bytes, all of it
 * emulated ring-0 code on PVM KVM: about 500 bytes/s. Instead, the
 * command's stdout and stderr are the FIFOs DIR/out and DIR/err; this
 * relay reads them straight into a window of guest memory (mapped through
 * /dev/mem) and rings the doorbell once per read, up to 64 KiB at a time,
 * and the VMM copies the bytes to its stdout or stderr during that exit.
 *
 * It finds the window through the doorbell page's own registers. When they
 * do not say "HVO1" (QEMU, another VMM, no /dev/mem) it exits 1 and /init
 * keeps the UARTs. Otherwise it makes DIR/{out,err,sync,ack}, writes the
 * background relay's pid to DIR/pid and exits 0; the relay, in a session
 * of its own, runs until the guest powers off. A line written to DIR/sync
 * asks it to move everything written so far, then answer a line on
 * DIR/ack: /init reports a command's exit only after its output. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define DOORBELL_GPA 0xfeb00000UL
#define MAGIC 0x314f5648u /* "HVO1" little-endian */
#define REG_MAGIC 0
#define REG_WINDOW 1
#define REG_SIZE 2
#define REG_PUSH 3
#define CHAN_STDOUT 1u
#define CHAN_STDERR 2u

static volatile uint32_t *regs;
static char *window;
static size_t window_size;

static int fail(const char *what)
{
    fprintf(stderr, "hv-output: %s: %s\n", what, strerror(errno));
    return 1;
}

/* Moves one read's worth of FIFO `fd` to channel `chan`. Returns the bytes
 * moved, 0 when the FIFO is empty. */
static ssize_t move(int fd, uint32_t chan)
{
    ssize_t n;
    do
        n = read(fd, window, window_size);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return 0;
    regs[REG_PUSH] = (chan << 24) | (uint32_t)n;
    return n;
}

static int make_fifo(const char *dir, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (mkfifo(path, 0600) != 0 && errno != EEXIST)
        return -1;
    /* Read-write: never blocks opening, never sees end-of-file when the
     * last command's copy closes. */
    return open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: hv-output DIR\n");
        return 2;
    }
    const char *dir = argv[1];
    /* The doorbell uncached (O_SYNC), the window as plain memory. */
    int mmio = open("/dev/mem", O_RDWR | O_SYNC | O_CLOEXEC);
    if (mmio < 0)
        return fail("open /dev/mem");
    regs = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mmio, DOORBELL_GPA);
    if (regs == MAP_FAILED)
        return fail("map the doorbell page");
    if (regs[REG_MAGIC] != MAGIC) {
        fprintf(stderr, "hv-output: no output window here; the UARTs stay in use\n");
        return 1;
    }
    uint32_t gpa = regs[REG_WINDOW];
    window_size = regs[REG_SIZE];
    if (gpa % 4096 != 0 || window_size == 0 || window_size > (1u << 24)) {
        fprintf(stderr, "hv-output: implausible window %#x+%#zx\n", gpa, window_size);
        return 1;
    }
    int mem = open("/dev/mem", O_RDWR | O_CLOEXEC);
    if (mem < 0)
        return fail("open /dev/mem");
    window = mmap(NULL, window_size, PROT_READ | PROT_WRITE, MAP_SHARED, mem, gpa);
    if (window == MAP_FAILED)
        return fail("map the window");
    if (mkdir(dir, 0700) != 0 && errno != EEXIST)
        return fail("mkdir");
    int out = make_fifo(dir, "out"), err = make_fifo(dir, "err");
    int sync_req = make_fifo(dir, "sync"), ack = make_fifo(dir, "ack");
    if (out < 0 || err < 0 || sync_req < 0 || ack < 0)
        return fail("make the FIFOs");

    pid_t pid = fork();
    if (pid < 0)
        return fail("fork");
    if (pid > 0) {
        char path[256];
        snprintf(path, sizeof path, "%s/pid", dir);
        FILE *f = fopen(path, "w");
        if (!f || fprintf(f, "%d\n", (int)pid) < 0 || fclose(f) != 0)
            return fail("write the pid file");
        return 0;
    }
    /* Out of /init's process group, so a signal to it or to a command's
     * group never reaches the relay. */
    setsid();
    struct pollfd p[3] = {
        {.fd = out, .events = POLLIN},
        {.fd = err, .events = POLLIN},
        {.fd = sync_req, .events = POLLIN},
    };
    for (;;) {
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            return fail("poll");
        }
        if (p[0].revents & POLLIN)
            move(out, CHAN_STDOUT);
        if (p[1].revents & POLLIN)
            move(err, CHAN_STDERR);
        if (p[2].revents & POLLIN) {
            char req[64];
            ssize_t n = read(sync_req, req, sizeof req);
            /* Everything written before the request is in the FIFOs now:
             * move until both are empty, then answer once per request. */
            while (move(out, CHAN_STDOUT) + move(err, CHAN_STDERR) > 0)
                ;
            for (ssize_t i = 0; i < n; i++)
                if (req[i] == '\n' && write(ack, "k\n", 2) != 2)
                    return fail("answer on ack");
        }
    }
}
