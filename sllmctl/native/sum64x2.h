/* sum64x2, the checksum of every 16 MiB chunk (docs/format.md, "Checksums"), for _fastio.c.
 * A header of its own so that each file stays short; twin.py holds its Python twin. */
#ifndef SLLMCTL_SUM64X2_H
#define SLLMCTL_SUM64X2_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define PAGE_WORDS 512
#define PAGE_BYTES (8 * PAGE_WORDS)

typedef struct {
    uint64_t s1, s2, pages;
} sum_state;

static inline uint64_t load_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* an unaligned load on x86 and arm64 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Sum of nwords words; eight independent accumulators so that -O3 vectorizes it. */
static uint64_t word_sum(const unsigned char *p, size_t nwords)
{
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    size_t i = 0;
    for (; i + 8 <= nwords; i += 8, p += 64) {
        a0 += load_le64(p);
        a1 += load_le64(p + 8);
        a2 += load_le64(p + 16);
        a3 += load_le64(p + 24);
        a4 += load_le64(p + 32);
        a5 += load_le64(p + 40);
        a6 += load_le64(p + 48);
        a7 += load_le64(p + 56);
    }
    for (; i < nwords; i++, p += 8)
        a0 += load_le64(p);
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
}

static inline void add_page(sum_state *st, uint64_t page)
{
    st->pages++;
    st->s1 += page;
    st->s2 += st->pages * page;
}

/* Feeds n bytes. Every call but the last must pass a multiple of PAGE_BYTES. */
static void sum_update(sum_state *st, const unsigned char *p, size_t n)
{
    for (; n >= PAGE_BYTES; p += PAGE_BYTES, n -= PAGE_BYTES)
        add_page(st, word_sum(p, PAGE_WORDS));
    if (n) {
        uint64_t page = word_sum(p, n / 8);
        size_t tail = n % 8;
        if (tail) {
            unsigned char w[8] = {0};
            memcpy(w, p + n - tail, tail);
            page += load_le64(w);
        }
        add_page(st, page);
    }
}

static PyObject *sum_hex(const sum_state *st)
{
    char text[33];
    snprintf(text, sizeof text, "%016" PRIx64 "%016" PRIx64, st->s1, st->s2);
    return PyUnicode_FromStringAndSize(text, 32);
}

/* A list of the hex sums of the first n states. */
static PyObject *sum_list(const sum_state *sums, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *s = sum_hex(&sums[i]);
        if (!s) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, s);
    }
    return list;
}

#endif /* SLLMCTL_SUM64X2_H */
