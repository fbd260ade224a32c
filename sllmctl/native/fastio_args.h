/* Argument conversion and checks of _fastio.c's functions: the checks twin._check makes, in
 * the same order and with the same messages. */
#ifndef SLLMCTL_FASTIO_ARGS_H
#define SLLMCTL_FASTIO_ARGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

static int conv_addr(PyObject *o, void *out)
{
    PyObject *index = PyNumber_Index(o);
    if (!index)
        return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "addr must be a non-negative 64-bit address");
        }
        return 0;
    }
    *(uintptr_t *)out = (uintptr_t)v;
    return 1;
}

/* The checks twin._check makes, in the same order and with the same messages. */
static int check_span(uintptr_t addr, Py_ssize_t length, long long offset)
{
    if (length < 0) {
        PyErr_SetString(PyExc_ValueError, "length must be >= 0");
        return -1;
    }
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "offset must be >= 0");
        return -1;
    }
    if (addr == 0 && length > 0) {
        PyErr_SetString(PyExc_ValueError, "addr is NULL");
        return -1;
    }
    return 0;
}

static int check_positive(Py_ssize_t v, const char *message)
{
    if (v > 0)
        return 0;
    PyErr_SetString(PyExc_ValueError, message);
    return -1;
}

static int check_chunk(Py_ssize_t chunk_size)
{
    if (chunk_size > 0 && chunk_size % 8 == 0)
        return 0;
    PyErr_SetString(PyExc_ValueError, "chunk_size must be a positive multiple of 8");
    return -1;
}

static int check_words(Py_ssize_t length)
{
    if (length % 8 == 0)
        return 0;
    PyErr_SetString(PyExc_ValueError, "length must be a multiple of 8");
    return -1;
}

#endif /* SLLMCTL_FASTIO_ARGS_H */
