/* _fastio: the hot I/O loop of the checkpoint loader.
 *
 * Four functions over raw addresses, each with a pure-Python twin in twin.py that gives the
 * same results (tests/test_native.py compares them byte for byte):
 *
 *   checksum(addr, length) -> str                sum64x2 of length bytes at addr
 *   checksums(addr, length, chunk_size) -> list  one sum64x2 per chunk (the last may be shorter)
 *   pread_into(fd, addr, length, offset, threads=1, piece=8<<20) -> int
 *   read_verify(fd, addr, length, offset, chunk_size, threads) -> (int, list)
 *
 * sum64x2 (docs/format.md, sllmctl/store/format.py::checksum_numpy): little-endian uint64
 * words, pages of 512 words, P_p = page sum, s1 = sum P_p, s2 = sum (p+1) P_p, all mod 2^64,
 * printed as 32 hex digits. A final partial word (only possible after a ragged EOF in the
 * read functions) counts as zero-extended.
 *
 * Reads: the range is cut into pieces (chunks for read_verify) that `threads` POSIX threads
 * take from a shared counter, so that up to `threads` preads are outstanding. Pieces past the
 * end of a regular file (fstat at the start) are not read, which keeps O_DIRECT happy: its
 * final read comes back short at EOF and is not retried at an unaligned offset. The GIL is
 * released for all the work; the caller keeps the memory alive and writable meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FASTIO_ABI 1 /* twin.ABI; bump both when a signature or result changes */
#define MAX_IO ((size_t)1 << 30) /* bytes per pread call (Linux stops near 2 GiB); 4096-aligned */
#define HOT_READ ((size_t)1 << 20) /* read_verify sub-read on buffered fds: still in L2 when summed */
#define DEFAULT_PIECE ((Py_ssize_t)8 << 20)

#include "sum64x2.h"
#include "fastio_args.h"

/* ---------------------------------------------------------------- reads */

/* End of fd's data (the size of a regular file), or -1 when unknown; -errno on failure. */
static int file_end(int fd, int64_t *eof)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    *eof = S_ISREG(st.st_mode) ? (int64_t)st.st_size : -1;
    return 0;
}

static int is_direct(int fd)
{
#ifdef O_DIRECT
    int flags = fcntl(fd, F_GETFL);
    return flags != -1 && (flags & O_DIRECT);
#else
    (void)fd;
    return 0;
#endif
}

typedef struct {
    int fd;
    unsigned char *base;
    int64_t offset;
    size_t length;
    size_t piece;    /* bytes per task: the piece, or the chunk for read_verify */
    size_t step;     /* bytes per pread request within a task */
    int64_t eof;     /* -1: unknown */
    sum_state *sums; /* NULL: read only */
    size_t ntasks;
    size_t *got; /* bytes read per task */
    atomic_size_t next;
    atomic_int err; /* first errno seen; 0 while all is well */
} job_t;

/* Reads task i: until it is full, the file ends or pread returns 0; sums it if asked.
 * Returns 0 or an errno. */
static int run_task(job_t *j, size_t i)
{
    size_t start = i * j->piece;
    size_t want = j->length - start < j->piece ? j->length - start : j->piece;
    unsigned char *dst = j->base + start;
    int64_t off = j->offset + (int64_t)start;
    sum_state *st = j->sums ? &j->sums[i] : NULL;
    size_t got = 0, summed = 0;
    while (got < want && (j->eof < 0 || off + (int64_t)got < j->eof)) {
        size_t ask = want - got < j->step ? want - got : j->step;
        ssize_t r = pread(j->fd, dst + got, ask, (off_t)(off + (int64_t)got));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            break;
        got += (size_t)r;
        if (st) { /* sum the whole pages just read while they are in cache */
            size_t whole = (got - summed) / PAGE_BYTES * PAGE_BYTES;
            sum_update(st, dst + summed, whole);
            summed += whole;
        }
    }
    if (st)
        sum_update(st, dst + summed, got - summed);
    j->got[i] = got;
    return 0;
}

static void *worker(void *arg)
{
    job_t *j = arg;
    while (atomic_load_explicit(&j->err, memory_order_relaxed) == 0) {
        size_t i = atomic_fetch_add(&j->next, 1);
        if (i >= j->ntasks)
            break;
        int e = run_task(j, i);
        if (e) {
            int none = 0;
            atomic_compare_exchange_strong(&j->err, &none, e);
            break;
        }
    }
    return NULL;
}

/* Runs the job on `threads` threads, the caller's included; returns 0 or an errno.
 * Helper threads start with every signal blocked, so signals stay with Python's thread. */
static int run_job(job_t *j, int threads)
{
    size_t n = (size_t)threads < j->ntasks ? (size_t)threads : j->ntasks;
    pthread_t *tids = NULL;
    size_t started = 0;
    if (n > 1 && (tids = malloc((n - 1) * sizeof *tids)) != NULL) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &old);
        for (; started < n - 1; started++)
            if (pthread_create(&tids[started], NULL, worker, j) != 0)
                break; /* fewer threads: the work still gets done */
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    worker(j);
    for (size_t t = 0; t < started; t++)
        pthread_join(tids[t], NULL);
    free(tids);
    return atomic_load(&j->err);
}

/* Bytes read from the start up to the first short task: what the caller can use. */
static size_t contiguous(const job_t *j)
{
    size_t total = 0;
    for (size_t i = 0; i < j->ntasks; i++) {
        size_t left = j->length - i * j->piece;
        total += j->got[i];
        if (j->got[i] < (left < j->piece ? left : j->piece))
            break;
    }
    return total;
}

/* Shared by pread_into and read_verify: returns 0, or -1 with an exception set. */
static int read_job(job_t *j, int threads, size_t *total)
{
    size_t whole = j->piece < MAX_IO ? j->piece : MAX_IO;
    int64_t eof = -1;
    int e;
    j->ntasks = j->length ? (j->length - 1) / j->piece + 1 : 0;
    j->got = calloc(j->ntasks ? j->ntasks : 1, sizeof *j->got);
    if (!j->got) {
        PyErr_NoMemory();
        return -1;
    }
    atomic_init(&j->next, 0);
    atomic_init(&j->err, 0);
    Py_BEGIN_ALLOW_THREADS
    e = -file_end(j->fd, &eof);
    if (e == 0) {
        j->eof = eof;
        /* Summing: buffered reads come in L2-sized bites; O_DIRECT bypasses the cache anyway */
        j->step = j->sums && !is_direct(j->fd) && HOT_READ < whole ? HOT_READ : whole;
        e = run_job(j, threads);
    }
    Py_END_ALLOW_THREADS
    if (e) {
        errno = e;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    *total = contiguous(j);
    return 0;
}

/* ---------------------------------------------------------------- functions */

PyDoc_STRVAR(checksum_doc,
             "checksum($module, addr, length)\n--\n\n"
             "sum64x2 of `length` bytes at address `addr`, as 32 hex digits (s1 then s2).\n"
             "`length` must be a multiple of 8. Releases the GIL.");

static PyObject *fastio_checksum(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"addr", "length", NULL};
    uintptr_t addr;
    Py_ssize_t length;
    sum_state st = {0, 0, 0};
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&n:checksum", names, conv_addr, &addr, &length))
        return NULL;
    if (check_span(addr, length, 0) || check_words(length))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    sum_update(&st, (const unsigned char *)addr, (size_t)length);
    Py_END_ALLOW_THREADS
    return sum_hex(&st);
}

PyDoc_STRVAR(checksums_doc,
             "checksums($module, addr, length, chunk_size)\n--\n\n"
             "One sum64x2 per `chunk_size` bytes at `addr` (the last chunk may be shorter).\n"
             "`length` and `chunk_size` must be multiples of 8. Releases the GIL.");

static PyObject *fastio_checksums(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"addr", "length", "chunk_size", NULL};
    uintptr_t addr;
    Py_ssize_t length, chunk;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&nn:checksums", names, conv_addr, &addr, &length,
                                     &chunk))
        return NULL;
    if (check_span(addr, length, 0) || check_words(length) || check_chunk(chunk))
        return NULL;
    size_t n = length ? (size_t)(length - 1) / (size_t)chunk + 1 : 0;
    sum_state *sums = calloc(n ? n : 1, sizeof *sums);
    if (!sums)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++) {
        size_t start = i * (size_t)chunk;
        size_t left = (size_t)length - start;
        sum_update(&sums[i], (const unsigned char *)addr + start,
                   left < (size_t)chunk ? left : (size_t)chunk);
    }
    Py_END_ALLOW_THREADS
    PyObject *list = sum_list(sums, n);
    free(sums);
    return list;
}

PyDoc_STRVAR(pread_into_doc,
             "pread_into($module, fd, addr, length, offset, threads=1, piece=8388608)\n--\n\n"
             "Read `length` bytes of `fd` at `offset` into memory at `addr`, as `piece`-sized\n"
             "preads shared by `threads` threads. Returns the bytes read: less than `length`\n"
             "only at EOF. Retries short reads and EINTR; raises OSError. Works with O_DIRECT\n"
             "(addr, offset, piece aligned). Releases the GIL.");

static PyObject *fastio_pread_into(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"fd", "addr", "length", "offset", "threads", "piece", NULL};
    int fd, threads = 1;
    uintptr_t addr;
    Py_ssize_t length, piece = DEFAULT_PIECE;
    long long offset;
    size_t total = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&nL|in:pread_into", names, &fd, conv_addr,
                                     &addr, &length, &offset, &threads, &piece))
        return NULL;
    if (check_span(addr, length, offset) || check_positive(threads, "threads must be >= 1") ||
        check_positive(piece, "piece must be >= 1"))
        return NULL;
    job_t j = {.fd = fd,
               .base = (unsigned char *)addr,
               .offset = offset,
               .length = (size_t)length,
               .piece = (size_t)piece};
    int rc = read_job(&j, threads, &total);
    free(j.got);
    if (rc)
        return NULL;
    return PyLong_FromSize_t(total);
}

PyDoc_STRVAR(read_verify_doc,
             "read_verify($module, fd, addr, length, offset, chunk_size, threads)\n--\n\n"
             "pread_into with one task per `chunk_size` chunk, each summed (sum64x2) as it is\n"
             "read. Returns (bytes read, checksums of the chunks holding them); a chunk cut by\n"
             "EOF is summed over the bytes read. Releases the GIL.");

static PyObject *fastio_read_verify(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"fd", "addr", "length", "offset", "chunk_size", "threads", NULL};
    int fd, threads;
    uintptr_t addr;
    Py_ssize_t length, chunk;
    long long offset;
    size_t total = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&nLni:read_verify", names, &fd, conv_addr,
                                     &addr, &length, &offset, &chunk, &threads))
        return NULL;
    if (check_span(addr, length, offset) || check_chunk(chunk) ||
        check_positive(threads, "threads must be >= 1"))
        return NULL;
    size_t n = length ? (size_t)(length - 1) / (size_t)chunk + 1 : 0;
    job_t j = {.fd = fd,
               .base = (unsigned char *)addr,
               .offset = offset,
               .length = (size_t)length,
               .piece = (size_t)chunk,
               .sums = calloc(n ? n : 1, sizeof(sum_state))};
    if (!j.sums)
        return PyErr_NoMemory();
    PyObject *result = NULL;
    if (read_job(&j, threads, &total) == 0) {
        size_t have = total ? (total - 1) / (size_t)chunk + 1 : 0;
        PyObject *list = sum_list(j.sums, have);
        if (list)
            result = Py_BuildValue("(nN)", (Py_ssize_t)total, list);
    }
    free(j.got);
    free(j.sums);
    return result;
}

/* ---------------------------------------------------------------- module */

static PyMethodDef fastio_methods[] = {
    {"checksum", (PyCFunction)(void (*)(void))fastio_checksum, METH_VARARGS | METH_KEYWORDS,
     checksum_doc},
    {"checksums", (PyCFunction)(void (*)(void))fastio_checksums, METH_VARARGS | METH_KEYWORDS,
     checksums_doc},
    {"pread_into", (PyCFunction)(void (*)(void))fastio_pread_into, METH_VARARGS | METH_KEYWORDS,
     pread_into_doc},
    {"read_verify", (PyCFunction)(void (*)(void))fastio_read_verify, METH_VARARGS | METH_KEYWORDS,
     read_verify_doc},
    {NULL, NULL, 0, NULL},
};

static int fastio_exec(PyObject *m)
{
    return PyModule_AddIntConstant(m, "ABI", FASTIO_ABI);
}

static PyModuleDef_Slot fastio_slots[] = {
    {Py_mod_exec, (void *)fastio_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED}, /* no module state; all work is on the caller's memory */
#endif
    {0, NULL},
};

static struct PyModuleDef fastio_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sllmctl.native._fastio",
    .m_doc = "Checksums and parallel preads over raw addresses (see sllmctl/native/twin.py).",
    .m_size = 0,
    .m_methods = fastio_methods,
    .m_slots = fastio_slots,
};

PyMODINIT_FUNC PyInit__fastio(void)
{
    return PyModuleDef_Init(&fastio_module);
}
