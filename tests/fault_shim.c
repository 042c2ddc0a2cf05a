/* An LD_PRELOAD shim that makes reads of chosen files fail like a disk with a bad region.
 *
 *   FASTFP8_FAULT_MARKER  reads of files whose path contains this string are faulted
 *   FASTFP8_FAULT_AFTER   bytes [0, AFTER) of such a file read normally; a read that starts
 *                         at or past AFTER fails, one that crosses it comes back short
 *                         (default 0: every read fails)
 *   FASTFP8_FAULT_ERRNO   the error (default EIO)
 *
 * pread, pread64, read, preadv, preadv2 and readv are intercepted. Reads through a memory
 * mapping are not (they are page faults, not calls). Build:
 *   cc -shared -fPIC -o shim.so tests/fault_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*pread_fn)(int, void *, size_t, off_t);
typedef ssize_t (*read_fn)(int, void *, size_t);
typedef ssize_t (*preadv_fn)(int, const struct iovec *, int, off_t);
typedef ssize_t (*preadv2_fn)(int, const struct iovec *, int, off_t, int);
typedef ssize_t (*readv_fn)(int, const struct iovec *, int);

static void *next(const char *name) { return dlsym(RTLD_NEXT, name); }

/* Whether fd's file is faulted; the fault's threshold in *after. */
static int faulted(int fd, long long *after) {
    const char *marker = getenv("FASTFP8_FAULT_MARKER");
    if (!marker || !*marker) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    if (!strstr(path, marker)) return 0;
    const char *a = getenv("FASTFP8_FAULT_AFTER");
    *after = a ? atoll(a) : 0;
    return 1;
}

static int fault_errno(void) {
    const char *e = getenv("FASTFP8_FAULT_ERRNO");
    return e ? atoi(e) : EIO;
}

/* How many of `count` bytes at `offset` may be read: -1 (fail) or a possibly smaller count. */
static ssize_t allowed(int fd, off_t offset, size_t count) {
    long long after;
    if (!faulted(fd, &after)) return (ssize_t)count;
    if (count == 0) return 0;
    if (offset >= after) return -1;
    if ((long long)(offset + count) > after) return (ssize_t)(after - offset);
    return (ssize_t)count;
}

static ssize_t do_pread(const char *name, int fd, void *buf, size_t count, off_t offset) {
    static pread_fn real;
    if (!real) real = (pread_fn)next(name);
    ssize_t ok = allowed(fd, offset, count);
    if (ok < 0) {
        errno = fault_errno();
        return -1;
    }
    return real(fd, buf, (size_t)ok, offset);
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    return do_pread("pread", fd, buf, count, offset);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    return do_pread("pread64", fd, buf, count, offset);
}

ssize_t read(int fd, void *buf, size_t count) {
    static read_fn real;
    if (!real) real = (read_fn)next("read");
    long long after;
    if (faulted(fd, &after)) {
        off_t pos = lseek(fd, 0, SEEK_CUR);
        if (pos >= 0) {
            ssize_t ok = allowed(fd, pos, count);
            if (ok < 0) {
                errno = fault_errno();
                return -1;
            }
            count = (size_t)ok;
        }
    }
    return real(fd, buf, count);
}

/* Vectored reads: fail at or past the threshold, else read only the first buffer's worth
 * that fits (a short read is always allowed). */
static int vec_fault(int fd, off_t offset, const struct iovec *iov, int iovcnt, struct iovec *one) {
    long long after;
    if (iovcnt <= 0 || !faulted(fd, &after)) return 0;
    if (offset >= after) return -1;
    ssize_t ok = allowed(fd, offset, iov[0].iov_len);
    one->iov_base = iov[0].iov_base;
    one->iov_len = (size_t)(ok < 0 ? 0 : ok);
    return 1;
}

ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    static preadv_fn real;
    if (!real) real = (preadv_fn)next("preadv");
    struct iovec one;
    int f = vec_fault(fd, offset, iov, iovcnt, &one);
    if (f < 0) {
        errno = fault_errno();
        return -1;
    }
    return f ? real(fd, &one, 1, offset) : real(fd, iov, iovcnt, offset);
}

ssize_t preadv64(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    return preadv(fd, iov, iovcnt, offset);
}

ssize_t preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) {
    static preadv2_fn real;
    if (!real) real = (preadv2_fn)next("preadv2");
    struct iovec one;
    int f = offset >= 0 ? vec_fault(fd, offset, iov, iovcnt, &one) : 0;
    if (f < 0) {
        errno = fault_errno();
        return -1;
    }
    return f ? real(fd, &one, 1, offset, flags) : real(fd, iov, iovcnt, offset, flags);
}

ssize_t readv(int fd, const struct iovec *iov, int iovcnt) {
    static readv_fn real;
    if (!real) real = (readv_fn)next("readv");
    long long after;
    if (iovcnt > 0 && faulted(fd, &after)) {
        off_t pos = lseek(fd, 0, SEEK_CUR);
        if (pos >= 0) {
            struct iovec one;
            if (vec_fault(fd, pos, iov, iovcnt, &one) < 0) {
                errno = fault_errno();
                return -1;
            }
            return real(fd, &one, 1);
        }
    }
    return real(fd, iov, iovcnt);
}
