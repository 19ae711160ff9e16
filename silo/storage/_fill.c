/*
 * silo.storage._fill: append a {key: value | None} dict to a SlateDB WriteBatch in one
 * C loop.
 *
 * Why: a shard group-commits one WriteBatch per commit and a job's life writes ~18 keys.
 * Filling the batch from Python costs four ctypes calls per key (handle clone, two buffer
 * lowerings, put/delete), ~4.4 us per key; the same Rust calls made from C cost well under
 * 1 us. Nothing else changes: the same four functions of the slatedb 0.17.0 UniFFI
 * library, the same arguments, the same buffer encoding (big-endian i32 length, then the
 * bytes), in dict order. silo/storage/ffi.py owns the bindings and is the only caller.
 *
 * What stays in Python, on purpose:
 *  - Raising. On a non-zero RustCallStatus the loop stops and returns the status to
 *    Python, which raises through the bindings' own _uniffi_check_call_status, so the
 *    exception (type, message, lifting and freeing of the error buffer) is exactly the
 *    pure path's.
 *  - Anything unusual. An entry whose key or value is not an exact bytes, bytearray or
 *    C-contiguous 1-D byte memoryview, or is too long for an i32 length, stops the loop
 *    before any Rust call for that entry; Python fills that entry and the rest with the
 *    pure loop (same result, same exceptions, whatever they are).
 *
 * The GIL stays held throughout: the functions called never block, never call back into
 * Python and only take the batch's own mutex (ffi.py's GIL_HOLDING_SYMBOLS lists them
 * with the argument). Holding it also means no Python code runs during the loop, so the
 * dict cannot change under PyDict_Next and its borrowed references stay valid.
 *
 * Ownership (UniFFI): a method call consumes its handle argument (an Arc clone made by
 * clone_writebatch) and every RustBuffer argument, whether it succeeds or fails. So a
 * buffer is ours to free only until it is passed to put/delete, and the clone is made
 * last, right before the call that consumes it. An error status's error_buf belongs to
 * whoever raises from it (Python).
 *
 * The function addresses live in a Filler object (no C globals): each caller, a test with
 * its own stand-ins too, has its own. They point into the already-loaded Rust library
 * and stay valid in a forked child like every other mapping.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The UniFFI ABI of slatedb 0.17.0 (the bindings' _UniffiRustBuffer, _UniffiRustCallStatus
 * and the argtypes/restype of the functions below). */
typedef struct {
    uint64_t capacity;
    uint64_t len;
    uint8_t *data;
} RustBuffer;

typedef struct {
    int8_t code;
    RustBuffer error_buf;
} RustCallStatus;

typedef uint64_t (*clone_fn)(uint64_t handle, RustCallStatus *status);
typedef RustBuffer (*alloc_fn)(uint64_t size, RustCallStatus *status);
typedef void (*free_fn)(RustBuffer buf, RustCallStatus *status);
typedef void (*put_fn)(uint64_t handle, RustBuffer key, RustBuffer value,
                       RustCallStatus *status);
typedef void (*delete_fn)(uint64_t handle, RustBuffer key, RustCallStatus *status);

typedef struct {
    PyObject_HEAD
    clone_fn clone;
    alloc_fn alloc;
    free_fn free;
    put_fn put;
    delete_fn del;
} Filler;

/* Why the loop stopped (the second item of the returned tuple). */
enum {
    STOP_DEFER = 0, /* entry not handled here: Python fills it and the rest */
    STOP_PLAIN = 1, /* clone or alloc failed: the bindings check it without error type */
    STOP_ERROR = 2, /* put/delete failed: checked with the bindings' Error converter */
};

/* Largest payload whose framed length (4 + n) still fits the i32 the encoding uses. */
#define MAX_PAYLOAD ((Py_ssize_t)INT32_MAX - 4)

/* A key's or value's bytes, borrowed for the time of one entry. */
typedef struct {
    const char *p;
    Py_ssize_t n;
    Py_buffer view; /* held only for a memoryview */
    int has_view;
} bytes_ref;

static void bytes_release(bytes_ref *b)
{
    if (b->has_view) {
        PyBuffer_Release(&b->view);
        b->has_view = 0;
    }
}

/* Fill *b from an object the pure path treats as plain bytes: 1 on success, 0 (no
 * exception set) if Python should handle it. A memoryview counts only when it is 1-D,
 * C-contiguous and byte-formatted, where len() (the pure path's length prefix) is its
 * byte count; released views fail PyObject_GetBuffer and are deferred as well. */
static int bytes_get(PyObject *o, bytes_ref *b)
{
    b->has_view = 0;
    if (PyBytes_CheckExact(o)) {
        b->p = PyBytes_AS_STRING(o);
        b->n = PyBytes_GET_SIZE(o);
    } else if (PyByteArray_CheckExact(o)) {
        b->p = PyByteArray_AS_STRING(o);
        b->n = PyByteArray_GET_SIZE(o);
    } else if (PyMemoryView_Check(o)) {
        if (PyObject_GetBuffer(o, &b->view, PyBUF_FULL_RO) < 0) {
            PyErr_Clear();
            return 0;
        }
        b->has_view = 1;
        const char *f = b->view.format;
        int byte_format = f == NULL || ((f[0] == 'B' || f[0] == 'b' || f[0] == 'c') && f[1] == 0);
        if (b->view.ndim != 1 || b->view.itemsize != 1 || !byte_format ||
            !PyBuffer_IsContiguous(&b->view, 'C')) {
            bytes_release(b);
            return 0;
        }
        b->p = b->view.buf;
        b->n = b->view.len;
    } else {
        return 0;
    }
    if (b->n > MAX_PAYLOAD) {
        bytes_release(b);
        return 0;
    }
    return 1;
}

/* A Rust buffer holding the framed bytes (big-endian i32 length, then the payload), or
 * status->code set (nothing allocated). *odd is set, with nothing allocated, if the
 * allocator broke its contract (len == size): Python's path then handles the entry. */
static RustBuffer lower(const Filler *st, const bytes_ref *b, RustCallStatus *status,
                        int *odd)
{
    uint64_t size = 4 + (uint64_t)b->n;
    RustBuffer r = st->alloc(size, status);
    if (status->code)
        return r;
    if (r.len != size || r.data == NULL) {
        RustCallStatus scratch = {0};
        st->free(r, &scratch);
        *odd = 1;
        return r;
    }
    uint32_t n = (uint32_t)b->n;
    r.data[0] = (uint8_t)(n >> 24);
    r.data[1] = (uint8_t)(n >> 16);
    r.data[2] = (uint8_t)(n >> 8);
    r.data[3] = (uint8_t)n;
    if (n)
        memcpy(r.data + 4, b->p, n);
    return r;
}

/* The stop tuple (index, why, code, capacity, len, data address). If it cannot be built
 * the error buffer is freed here (nobody else would) and NULL returned. */
static PyObject *stop(const Filler *st, Py_ssize_t index, int why,
                      const RustCallStatus *status)
{
    PyObject *t = Py_BuildValue("(niiKKK)", index, why, (int)status->code,
                                (unsigned long long)status->error_buf.capacity,
                                (unsigned long long)status->error_buf.len,
                                (unsigned long long)(uintptr_t)status->error_buf.data);
    if (t == NULL && status->code) {
        RustCallStatus scratch = {0};
        st->free(status->error_buf, &scratch);
    }
    return t;
}

static PyObject *Filler_fill(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const Filler *st = (const Filler *)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "fill(handle, writes) takes 2 arguments");
        return NULL;
    }
    uint64_t handle = PyLong_AsUnsignedLongLong(args[0]);
    if (handle == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    PyObject *writes = args[1];
    RustCallStatus none = {0};
    if (!PyDict_CheckExact(writes)) /* a subclass may override items(): Python's job */
        return stop(st, 0, STOP_DEFER, &none);

    Py_ssize_t pos = 0, index = 0;
    PyObject *key, *value;
    for (; PyDict_Next(writes, &pos, &key, &value); index++) {
        bytes_ref k, v = {0};
        int is_delete = value == Py_None;
        if (!bytes_get(key, &k))
            return stop(st, index, STOP_DEFER, &none);
        if (!is_delete && !bytes_get(value, &v)) {
            bytes_release(&k);
            return stop(st, index, STOP_DEFER, &none);
        }

        RustCallStatus status = {0};
        int odd = 0;
        RustBuffer kb = lower(st, &k, &status, &odd);
        bytes_release(&k);
        if (status.code || odd) {
            if (!is_delete)
                bytes_release(&v);
            return stop(st, index, odd ? STOP_DEFER : STOP_PLAIN, &status);
        }
        RustBuffer vb = {0};
        if (!is_delete) {
            vb = lower(st, &v, &status, &odd);
            bytes_release(&v);
            if (status.code || odd) {
                RustCallStatus scratch = {0};
                st->free(kb, &scratch);
                return stop(st, index, odd ? STOP_DEFER : STOP_PLAIN, &status);
            }
        }

        uint64_t h = st->clone(handle, &status);
        if (status.code) {
            RustCallStatus scratch = {0};
            st->free(kb, &scratch);
            if (!is_delete)
                st->free(vb, &scratch);
            return stop(st, index, STOP_PLAIN, &status);
        }
        /* From here Rust owns h, kb and vb, also if the call fails. */
        if (is_delete)
            st->del(h, kb, &status);
        else
            st->put(h, kb, vb, &status);
        if (status.code)
            return stop(st, index, STOP_ERROR, &status);
    }
    Py_RETURN_NONE;
}

static PyObject *Filler_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    void *fn[5];
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "Filler() takes no keyword arguments");
        return NULL;
    }
    if (PyTuple_GET_SIZE(args) != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "Filler(clone, alloc, free, put, delete) takes 5 function addresses");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < 5; i++) {
        fn[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args, i));
        if (fn[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "Filler: a function address is 0");
            return NULL;
        }
    }
    Filler *self = (Filler *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    /* Object pointers to function pointers: the addresses come from dlsym (ctypes), for
     * which POSIX guarantees the round trip. */
    self->clone = (clone_fn)fn[0];
    self->alloc = (alloc_fn)fn[1];
    self->free = (free_fn)fn[2];
    self->put = (put_fn)fn[3];
    self->del = (delete_fn)fn[4];
    return (PyObject *)self;
}

static PyMethodDef Filler_methods[] = {
    {"fill", (PyCFunction)(void (*)(void))Filler_fill, METH_FASTCALL,
     "fill(handle, writes) -> None | (index, why, code, capacity, len, data)\n\n"
     "Append writes (a dict, bytes key -> bytes value or None for a delete) to the\n"
     "WriteBatch whose UniFFI handle is given, in dict order. None when every entry was\n"
     "appended. Otherwise entries before index were appended and the tuple says why it\n"
     "stopped: why 0, entry index was not touched (Python fills it and the rest); why 1\n"
     "or 2, a call for entry index failed with the returned RustCallStatus (1: clone or\n"
     "alloc, no error type; 2: put/delete, the Error type), whose error buffer the\n"
     "caller now owns."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FillerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "silo.storage._fill.Filler",
    .tp_basicsize = sizeof(Filler),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Filler(clone, alloc, free, put, delete): fills WriteBatches through the\n"
              "given addresses of the slatedb 0.17.0 UniFFI functions clone_writebatch,\n"
              "rustbuffer_alloc, rustbuffer_free, writebatch_put and writebatch_delete.\n"
              "Only for the exact version silo.storage.ffi checked.",
    .tp_new = Filler_new,
    .tp_methods = Filler_methods,
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "silo.storage._fill",
    .m_doc = "Append a dict of writes to a SlateDB WriteBatch in one C loop "
             "(see silo.storage.ffi.batch_writer).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fill(void)
{
    if (PyType_Ready(&FillerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Filler", (PyObject *)&FillerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
