/* silo.storage._wake: SlateDB's async completions without entering Python on Tokio threads.
 *
 * The UniFFI bindings resolve every awaited SlateDB call through a continuation
 * callback, `void (uint64_t data, int8_t poll_code)`, that Rust calls when the future
 * can make progress: from the polling thread itself when it is ready at once, otherwise
 * from a Tokio thread. The generated callback is a ctypes thunk, so every Tokio-thread
 * completion takes the GIL, makes and drops a Python thread state, and calls
 * loop.call_soon_threadsafe. Under CPython 3.11 that thread-state allocation can also
 * crash the process when tracemalloc stops at the wrong moment (see
 * silo/storage/wake.py).
 *
 * This module's continuation never touches Python. `data` carries a queue slot in its
 * top SLOT_BITS bits and a token (unique in the process, chosen by wake.py) below:
 *
 *   - called on a thread that is inside `poll()` below for that very `data` (the future
 *     was ready at once, or had been woken already): the code is handed back to poll()
 *     through a thread-local, so the caller needs no future, no fd and no loop pass;
 *   - otherwise: (data, code) is appended to the slot's queue under one process-wide
 *     mutex, and the queue's eventfd is written when the queue stops being empty. The
 *     event loop watches the eventfd and calls `Wake.drain()`, which returns the queued
 *     pairs; wake.py resolves the matching asyncio futures.
 *
 * The eventfd is written after the mutex is released. A worker process is pinned to one
 * core: written under the mutex, the write woke the event loop's thread, the kernel
 * switched to it at once, and its drain() then blocked on the mutex the Tokio thread
 * still held: two more context switches and two futex calls per completion (seen with
 * strace: FUTEX_WAIT on the lock right after epoll returned). A queue's eventfd is only
 * closed once no continuation is between its unlock and its write (`writers`), so the
 * fd number written to is never one that was closed and reused meanwhile.
 *
 * A completion for a slot that no longer has a queue, or for a token nobody waits for
 * (its task was cancelled), is dropped or ignored: Rust calls each stored continuation
 * exactly once, at the latest when the future is freed, and nothing here dereferences
 * `data`. If a queue cannot grow (malloc failure) the completion is counted as lost and
 * drain() reports it with the pair (0, 1): wake.py then wakes every waiter of that
 * queue, which re-polls its future (a spurious POLL_WAKE is harmless in UniFFI's
 * protocol), so nothing hangs.
 *
 * Fork: queues belong to the process that made them. A pthread_atfork child handler
 * resets the mutex (a Tokio thread of the parent may have held it at the fork), detaches
 * every queue and closes their eventfds in the child; the Python objects there become
 * inert (drain() returns nothing) and wake.py makes new ones.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define SLOT_BITS 10
#define MAX_QUEUES (1u << SLOT_BITS)
#define TOKEN_BITS (64 - SLOT_BITS)
#define MIN_CAPACITY 64

typedef struct {
    uint64_t data;
    int8_t code;
} entry;

typedef struct {
    entry *items;   /* appended to by continuation() under g_lock */
    size_t len, cap;
    entry *spare;   /* swapped with items by drain(); touched only under the GIL */
    size_t spare_cap;
    int efd;        /* -1 once closed (or detached in a forked child) */
    int signalled;  /* the eventfd was written (or is being written) since the last drain */
    int writers;    /* continuations about to write efd outside the lock (atomic) */
    uint64_t lost;  /* completions dropped because items could not grow */
    unsigned slot;
    int attached;   /* g_slots[slot] points here */
} queue;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static queue *g_slots[MAX_QUEUES];

/* The poll() in progress on this thread, if any. */
static _Thread_local struct {
    uint64_t data;
    int armed;
    int hit;
    int8_t code;
} t_sync;

typedef void (*continuation_fn)(uint64_t, int8_t);
typedef void (*poll_fn)(uint64_t, continuation_fn, uint64_t);

/* The continuation handed to Rust. Runs on any thread, never with Python state. */
static void continuation(uint64_t data, int8_t code)
{
    if (t_sync.armed && t_sync.data == data) {
        t_sync.code = code;
        t_sync.hit = 1;
        return;
    }
    unsigned slot = (unsigned)(data >> TOKEN_BITS);
    queue *writer = NULL;
    int efd = -1;
    pthread_mutex_lock(&g_lock);
    queue *q = g_slots[slot];
    if (q != NULL) {
        if (q->len == q->cap) {
            size_t cap = q->cap ? q->cap * 2 : MIN_CAPACITY;
            entry *grown = realloc(q->items, cap * sizeof(entry));
            if (grown != NULL) {
                q->items = grown;
                q->cap = cap;
            }
        }
        if (q->len < q->cap) {
            q->items[q->len].data = data;
            q->items[q->len].code = code;
            q->len++;
        } else {
            q->lost++;
        }
        if (!q->signalled) {
            q->signalled = 1;
            efd = q->efd;
            /* Counted under the lock: retire() waits for it before closing efd. */
            __atomic_add_fetch(&q->writers, 1, __ATOMIC_ACQ_REL);
            writer = q;
        }
    }
    pthread_mutex_unlock(&g_lock);
    if (writer != NULL) {
        uint64_t one = 1;
        ssize_t n = write(efd, &one, sizeof one);
        (void)n; /* only EAGAIN at a counter of 2^64-2 is possible: still readable */
        __atomic_sub_fetch(&writer->writers, 1, __ATOMIC_RELEASE);
    }
}

/* Must hold g_lock. No continuation reaches q afterwards; call retire() after unlocking. */
static void detach_locked(queue *q)
{
    if (q->attached) {
        g_slots[q->slot] = NULL;
        q->attached = 0;
    }
}

/* After detach_locked (and without g_lock): close q's eventfd once the continuations
 * that were about to write it have done so (a few instructions each; close is rare). */
static void retire(queue *q)
{
    while (__atomic_load_n(&q->writers, __ATOMIC_ACQUIRE) != 0)
        sched_yield();
    if (q->efd >= 0) {
        close(q->efd);
        q->efd = -1;
    }
}

static void after_fork_child(void)
{
    /* Only this thread exists now; the parent's Tokio threads are gone. */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&g_lock, &fresh, sizeof fresh);
    for (unsigned i = 0; i < MAX_QUEUES; i++) {
        queue *q = g_slots[i];
        if (q != NULL) {
            q->attached = 0;
            q->len = 0;
            q->signalled = 0;
            q->writers = 0;
            if (q->efd >= 0) {
                close(q->efd);
                q->efd = -1;
            }
            g_slots[i] = NULL;
        }
    }
}

/* ---- the Wake type: one queue, owned by one event loop -------------------------- */

typedef struct {
    PyObject_HEAD
    queue *q;
} WakeObject;

static PyObject *Wake_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Wake() takes no arguments");
        return NULL;
    }
    queue *q = calloc(1, sizeof *q);
    if (q == NULL)
        return PyErr_NoMemory();
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        free(q);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_mutex_lock(&g_lock);
    unsigned slot = MAX_QUEUES;
    for (unsigned i = 0; i < MAX_QUEUES; i++) {
        if (g_slots[i] == NULL) {
            slot = i;
            break;
        }
    }
    if (slot < MAX_QUEUES) {
        q->slot = slot;
        q->attached = 1;
        g_slots[slot] = q;
    }
    pthread_mutex_unlock(&g_lock);
    if (slot == MAX_QUEUES) {
        close(q->efd);
        free(q);
        PyErr_Format(PyExc_RuntimeError, "all %u wake queues are in use", MAX_QUEUES);
        return NULL;
    }
    WakeObject *self = (WakeObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        pthread_mutex_lock(&g_lock);
        detach_locked(q);
        pthread_mutex_unlock(&g_lock);
        retire(q);
        free(q);
        return NULL;
    }
    self->q = q;
    return (PyObject *)self;
}

static void Wake_dealloc(WakeObject *self)
{
    queue *q = self->q;
    if (q != NULL) {
        pthread_mutex_lock(&g_lock);
        detach_locked(q);
        pthread_mutex_unlock(&g_lock);
        retire(q);
        free(q->items);
        free(q->spare);
        free(q);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Wake_close(WakeObject *self, PyObject *unused)
{
    pthread_mutex_lock(&g_lock);
    detach_locked(self->q);
    self->q->len = 0;
    pthread_mutex_unlock(&g_lock);
    retire(self->q);
    Py_RETURN_NONE;
}

static PyObject *Wake_fileno(WakeObject *self, PyObject *unused)
{
    if (self->q->efd < 0) {
        PyErr_SetString(PyExc_ValueError, "wake queue is closed");
        return NULL;
    }
    return PyLong_FromLong(self->q->efd);
}

static PyObject *Wake_drain(WakeObject *self, PyObject *unused)
{
    queue *q = self->q;
    pthread_mutex_lock(&g_lock);
    if (!q->attached) {
        pthread_mutex_unlock(&g_lock);
        return PyList_New(0);
    }
    if (q->signalled) {
        /* Reset the eventfd before clearing `signalled`, both under the lock: a
         * completion queued after this sees signalled == 0 and writes it again. */
        uint64_t count;
        ssize_t n = read(q->efd, &count, sizeof count);
        (void)n; /* EAGAIN only if nobody wrote: nothing to reset */
        q->signalled = 0;
    }
    entry *items = q->items;
    size_t len = q->len, cap = q->cap;
    uint64_t lost = q->lost;
    q->items = q->spare;
    q->cap = q->spare_cap;
    q->len = 0;
    q->lost = 0;
    pthread_mutex_unlock(&g_lock);
    q->spare = items;
    q->spare_cap = cap;

    PyObject *out = PyList_New((Py_ssize_t)(len + (lost ? 1 : 0)));
    if (out == NULL)
        goto fail;
    for (size_t i = 0; i < len; i++) {
        PyObject *pair = Py_BuildValue("(Ki)", (unsigned long long)items[i].data,
                                       (int)items[i].code);
        if (pair == NULL) {
            Py_DECREF(out);
            goto fail;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, pair);
    }
    if (lost) {
        PyObject *pair = Py_BuildValue("(Ki)", 0ULL, 1);
        if (pair == NULL) {
            Py_DECREF(out);
            goto fail;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)len, pair);
    }
    return out;

fail:
    /* Could not hand the pairs over: count them as lost, so the next drain tells the
     * caller to wake every waiter instead of leaving some asleep for ever. */
    pthread_mutex_lock(&g_lock);
    if (q->attached) {
        q->lost += len + lost;
        if (!q->signalled) {
            uint64_t one = 1;
            ssize_t n = write(q->efd, &one, sizeof one);
            (void)n;
            q->signalled = 1;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return NULL;
}

static PyObject *Wake_get_base(WakeObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong((unsigned long long)self->q->slot << TOKEN_BITS);
}

static PyObject *Wake_get_attached(WakeObject *self, void *closure)
{
    pthread_mutex_lock(&g_lock);
    int attached = self->q->attached;
    pthread_mutex_unlock(&g_lock);
    return PyBool_FromLong(attached);
}

static PyMethodDef Wake_methods[] = {
    {"fileno", (PyCFunction)Wake_fileno, METH_NOARGS,
     "The eventfd that becomes readable when completions are queued."},
    {"drain", (PyCFunction)Wake_drain, METH_NOARGS,
     "Queued (data, poll_code) pairs, oldest first; (0, 1) means some were lost."},
    {"close", (PyCFunction)Wake_close, METH_NOARGS,
     "Detach the queue and close its eventfd; later completions for it are dropped."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Wake_getset[] = {
    {"base", (getter)Wake_get_base, NULL, "The slot bits to OR into every token.", NULL},
    {"attached", (getter)Wake_get_attached, NULL,
     "False once closed or inherited through fork.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WakeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "silo.storage._wake.Wake",
    .tp_basicsize = sizeof(WakeObject),
    .tp_dealloc = (destructor)Wake_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A completion queue with an eventfd, for one event loop.",
    .tp_methods = Wake_methods,
    .tp_getset = Wake_getset,
    .tp_new = Wake_new,
};

/* ---- module functions --------------------------------------------------------- */

/* poll(poll_address, rust_future, data) -> int | None
 *
 * Calls the UniFFI `rust_future_poll_*` function at poll_address with this module's
 * continuation, releasing the GIL like ctypes did (the poll runs the Rust future on
 * this thread). Returns the poll code if the continuation ran for `data` before poll
 * returned (on this thread), else None: then it arrives through the queue of data's
 * slot. */
static PyObject *wake_poll(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "poll(poll_address, rust_future, data)");
        return NULL;
    }
    void *addr = PyLong_AsVoidPtr(args[0]);
    if (addr == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "poll_address is NULL");
        return NULL;
    }
    unsigned long long handle = PyLong_AsUnsignedLongLong(args[1]);
    if (handle == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long data = PyLong_AsUnsignedLongLong(args[2]);
    if (data == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (t_sync.armed) {
        PyErr_SetString(PyExc_RuntimeError, "poll() re-entered on one thread");
        return NULL;
    }
    poll_fn fn = (poll_fn)addr;
    t_sync.data = data;
    t_sync.hit = 0;
    t_sync.armed = 1;
    Py_BEGIN_ALLOW_THREADS
    fn((uint64_t)handle, continuation, (uint64_t)data);
    Py_END_ALLOW_THREADS
    t_sync.armed = 0;
    if (t_sync.hit)
        return PyLong_FromLong(t_sync.code);
    Py_RETURN_NONE;
}

/* complete(data, code): call the continuation as Rust would (tests, from any thread). */
static PyObject *wake_complete(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "complete(data, poll_code)");
        return NULL;
    }
    unsigned long long data = PyLong_AsUnsignedLongLong(args[0]);
    if (data == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long code = PyLong_AsLong(args[1]);
    if (code == -1 && PyErr_Occurred())
        return NULL;
    if (code < INT8_MIN || code > INT8_MAX) {
        PyErr_SetString(PyExc_OverflowError, "poll_code must fit in an int8");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    continuation((uint64_t)data, (int8_t)code);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *wake_continuation_address(PyObject *module, PyObject *unused)
{
    return PyLong_FromVoidPtr((void *)continuation);
}

static PyMethodDef module_methods[] = {
    {"poll", (PyCFunction)(void (*)(void))wake_poll, METH_FASTCALL,
     "poll(poll_address, rust_future, data) -> poll code if it completed at once, else None."},
    {"complete", (PyCFunction)(void (*)(void))wake_complete, METH_FASTCALL,
     "complete(data, poll_code): invoke the native continuation (for tests)."},
    {"continuation_address", wake_continuation_address, METH_NOARGS,
     "Address of the native continuation `void (uint64_t, int8_t)`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef wake_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "silo.storage._wake",
    .m_doc = "Native continuation and completion queues for SlateDB's UniFFI futures.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__wake(void)
{
    static int atfork_done = 0;
    if (!atfork_done) {
        int rc = pthread_atfork(NULL, NULL, after_fork_child);
        if (rc != 0) {
            errno = rc;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        atfork_done = 1;
    }
    if (PyType_Ready(&WakeType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&wake_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&WakeType);
    if (PyModule_AddObject(m, "Wake", (PyObject *)&WakeType) < 0) {
        Py_DECREF(&WakeType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "TOKEN_BITS", TOKEN_BITS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_QUEUES", MAX_QUEUES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
