/* hv-fileio: a fixed sequence of file system calls.
 *  1. openat(AT_FDCWD, "/etc/hostname"), read, write it to stdout, close;
 *  2. openat(/tmp/hv-fileio.tmp, O_CREAT|O_TRUNC|O_RDWR), write, lseek to 0,
 *     read back and compare, close, unlink;
 *  3. openat(/nonexistent) must fail with ENOENT.
 * Uses the plain system call wrappers (no stdio) for the file operations. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>

#include "hv-common.h"

#define TMPFILE "/tmp/hv-fileio.tmp"

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

int main(void)
{
    hv_init_stdio();
    char buf[256];

    /* 1. /etc/hostname to stdout */
    int fd = openat(AT_FDCWD, "/etc/hostname", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        printf("openat /etc/hostname failed: %s\n", strerror(errno));
        return 1;
    }
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
        printf("read /etc/hostname failed: %s\n", strerror(errno));
        return 1;
    }
    printf("read %zd bytes from /etc/hostname: ", n);
    fflush(stdout);
    if (write_all(STDOUT_FILENO, buf, (size_t)n) != 0) {
        perror("write stdout");
        return 1;
    }
    if (n == 0 || buf[n - 1] != '\n')
        printf("\n");
    if (close(fd) != 0) {
        perror("close /etc/hostname");
        return 1;
    }

    /* 2. create, write, seek, read back, unlink */
    static const char msg[] = "hello from hv-fileio\n";
    const size_t len = sizeof msg - 1;
    fd = openat(AT_FDCWD, TMPFILE, O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0) {
        printf("openat " TMPFILE " failed: %s\n", strerror(errno));
        return 1;
    }
    if (write_all(fd, msg, len) != 0) {
        printf("write " TMPFILE " failed: %s\n", strerror(errno));
        return 1;
    }
    printf("wrote %zu bytes to " TMPFILE "\n", len);
    off_t off = lseek(fd, 0, SEEK_SET);
    if (off != 0) {
        printf("lseek failed: %s\n", strerror(errno));
        return 1;
    }
    memset(buf, 0, sizeof buf);
    n = read(fd, buf, sizeof buf);
    if (n != (ssize_t)len || memcmp(buf, msg, len) != 0) {
        printf("read back %zd bytes, expected %zu matching bytes\n", n, len);
        return 1;
    }
    printf("read back %zd bytes after lseek: %s", n, buf);
    if (close(fd) != 0 || unlink(TMPFILE) != 0) {
        printf("close/unlink " TMPFILE " failed: %s\n", strerror(errno));
        return 1;
    }
    printf("unlinked " TMPFILE "\n");

    /* 3. a failing open */
    fd = openat(AT_FDCWD, "/nonexistent", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        printf("openat /nonexistent unexpectedly succeeded\n");
        return 1;
    }
    int e = errno;
    printf("openat /nonexistent failed: %s (%s)\n", e == ENOENT ? "ENOENT" : "unexpected errno",
           strerror(e));
    if (e != ENOENT)
        return 1;
    printf("fileio done\n");
    return 0;
}
