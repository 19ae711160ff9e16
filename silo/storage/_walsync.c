/* silo.storage._walsync: a commit's WAL fsync round without Python on the syncing thread.
 *
 * silo.storage.local_sync fsyncs each flush's new WAL objects and then `wal/` before a
 * commit's waiters are answered. Run as Python in a ThreadPoolExecutor, a round costs,
 * besides the fsyncs: run_in_executor's two futures and their callbacks on the loop
 * (~40 µs a call on this VM), the task chaining the rounds, call_soon_threadsafe's
 * self-pipe (a sendto and two recvfrom), and the GIL passed back and forth between the
 * pool thread and the loop at each of the round's five syscalls (strace -f, 1,000
 * commits: ~3.3 more futex calls per round across the threads).
 *
 * Here a round is one C job: `Rounds.submit(token, dir_fd, start)` queues it for one of
 * this object's threads (plain pthreads that never take the GIL), which opens
 * `<start>.sst`, `<start+1>.sst`, … relative to the open `wal/` fd until one is missing,
 * fsyncs and closes each, then fsyncs the directory if it found any. The result
 * (token, next id, errno, ns spent) is queued under a mutex and an eventfd is written
 * when the queue stops being empty; the loop watches the eventfd and `drain()` returns
 * the results. The ordering rule is unchanged: a result exists only after every fsync of
 * its round returned, and local_sync answers a commit's waiters only from its result.
 *
 * `sync_wal(dir_fd, start)` is the same round, synchronous with the GIL released (the
 * pool path and the tests).
 *
 * An error stops the round at once (no fsync of the directory after a failed file); the
 * errno goes back with the id of the object that failed. EINTR is retried, as Python's
 * os.open/os.fsync do (PEP 475).
 *
 * Fork: the threads do not exist in a child, and a mutex they held would stay held. An
 * object made in another process is inert in the child (methods raise, dealloc leaks it
 * rather than joining threads that are not there); local_sync makes a new one. "Made in
 * this process" is a fork counter (pthread_atfork), not getpid(): glibc does not cache
 * the pid, and two getpid syscalls per round (submit, drain) showed in strace.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define THREADS 2

static unsigned long g_forks; /* children forked into since load: 0 in the original */

static void after_fork_child(void) { g_forks++; }
#define STACK_BYTES (256 * 1024)

typedef struct job {
    struct job *next;
    uint64_t token;
    uint64_t start;
    int dir_fd;
} job;

typedef struct done {
    struct done *next;
    uint64_t token;
    uint64_t next_id;
    int err;
    int64_t ns;
} done;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The WAL object `id` opened relative to `wal/`: its fd, or -1 when it is missing (the
 * end of a round) or failed to open (then *err is the errno; ENOENT is not an error). */
static int open_wal(int dir_fd, uint64_t id, int *err)
{
    char name[40];
    snprintf(name, sizeof name, "%020llu.sst", (unsigned long long)id);
    int fd;
    do
        fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0 && errno != ENOENT)
        *err = errno;
    return fd;
}

/* One round: returns the first id not synced; *err is 0 or the errno that stopped it. */
static uint64_t round_run(int dir_fd, uint64_t start, int *err)
{
    uint64_t n = start;
    *err = 0;
    for (;;) {
        int fd = open_wal(dir_fd, n, err);
        if (fd < 0)
            break;
        int rc;
        do
            rc = fsync(fd);
        while (rc != 0 && errno == EINTR);
        int e = errno;
        close(fd);
        if (rc != 0) {
            *err = e;
            return n;
        }
        n++;
    }
    if (*err == 0 && n != start) {
        int rc;
        do
            rc = fsync(dir_fd);
        while (rc != 0 && errno == EINTR);
        if (rc != 0)
            *err = errno;
    }
    return n;
}

/* A round's `wal/` fsync, offered to the other thread (see round_overlapped). Lives on
 * the offering thread's stack, which waits for it to be done before it returns. */
typedef struct dirjob {
    struct dirjob *next;
    int dir_fd;
    int state; /* DIR_OFFERED, DIR_TAKEN, DIR_DONE: under lock */
    int err;
} dirjob;

enum { DIR_OFFERED, DIR_TAKEN, DIR_DONE };

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t more;
    pthread_cond_t dir_done;
    dirjob *dirs;           /* offered directory fsyncs, taken before rounds; under lock */
    int overlap;            /* offer them at all (Rounds(overlap=...)) */
    job *head, *tail;       /* waiting jobs, under lock */
    done *results;          /* finished rounds, newest first, under lock */
    int signalled;          /* efd written since the last drain, under lock */
    int stopping;           /* under lock */
    int started;            /* threads running (only the owner touches it, with the GIL) */
    pthread_t threads[THREADS];
    int efd;
    unsigned long owner; /* g_forks when made */
} RoundsObject;

static int fsync_retrying(int fd)
{
    int rc;
    do
        rc = fsync(fd);
    while (rc != 0 && errno == EINTR);
    return rc == 0 ? 0 : errno;
}

#define BATCH 32

/* round_run with the `wal/` fsync on the other thread while this one fsyncs the files:
 * two fsyncs of one round then share the device's cache flush instead of paying one
 * each. The directory fsync is offered only after every object it must cover was
 * opened here, i.e. linked: an object found later is left to the sequential rest (or the
 * next round), never counted as covered by a directory fsync that began before it was
 * linked. If the other thread is busy (another shard's round), this one takes the
 * offer back and does it after the files. Called with self->lock not held. */
static uint64_t round_overlapped(RoundsObject *self, int dir_fd, uint64_t start, int *err)
{
    int fds[BATCH];
    int count = 0;
    *err = 0;
    while (count < BATCH) {
        int fd = open_wal(dir_fd, start + count, err);
        if (fd < 0)
            break;
        fds[count++] = fd;
    }
    if (*err != 0 || count == 0) {
        for (int i = 0; i < count; i++)
            close(fds[i]);
        return start;
    }
    dirjob d = {.next = NULL, .dir_fd = dir_fd, .state = DIR_OFFERED, .err = 0};
    pthread_mutex_lock(&self->lock);
    d.next = self->dirs;
    self->dirs = &d;
    pthread_cond_signal(&self->more);
    pthread_mutex_unlock(&self->lock);

    uint64_t n = start;
    for (int i = 0; i < count; i++) {
        int e = *err == 0 ? fsync_retrying(fds[i]) : 0;
        close(fds[i]);
        if (*err == 0 && e != 0)
            *err = e;
        if (*err == 0)
            n++;
    }

    pthread_mutex_lock(&self->lock);
    if (d.state == DIR_OFFERED) { /* not taken: withdraw it and do it here */
        dirjob **p = &self->dirs;
        while (*p != &d)
            p = &(*p)->next;
        *p = d.next;
        d.state = DIR_TAKEN;
        pthread_mutex_unlock(&self->lock);
        d.err = fsync_retrying(dir_fd);
    } else {
        while (d.state != DIR_DONE)
            pthread_cond_wait(&self->dir_done, &self->lock);
        pthread_mutex_unlock(&self->lock);
    }
    if (*err == 0 && d.err != 0)
        *err = d.err;
    if (*err == 0 && count == BATCH) { /* more than one batch of objects: the rest */
        uint64_t m = round_run(dir_fd, n, err);
        n = *err == 0 ? m : n;
    }
    return n;
}

static void *worker(void *arg)
{
    RoundsObject *self = arg;
    pthread_mutex_lock(&self->lock);
    for (;;) {
        while (self->head == NULL && self->dirs == NULL && !self->stopping)
            pthread_cond_wait(&self->more, &self->lock);
        if (self->dirs != NULL) { /* another round's directory fsync: it waits for it */
            dirjob *d = self->dirs;
            self->dirs = d->next;
            d->state = DIR_TAKEN;
            pthread_mutex_unlock(&self->lock);
            int e = fsync_retrying(d->dir_fd);
            pthread_mutex_lock(&self->lock);
            d->err = e;
            d->state = DIR_DONE;
            pthread_cond_broadcast(&self->dir_done);
            continue;
        }
        if (self->head == NULL)
            break; /* stopping, and nothing left */
        job *j = self->head;
        self->head = j->next;
        if (self->head == NULL)
            self->tail = NULL;
        pthread_mutex_unlock(&self->lock);

        int64_t t0 = now_ns();
        int err;
        uint64_t n = self->overlap ? round_overlapped(self, j->dir_fd, j->start, &err)
                                   : round_run(j->dir_fd, j->start, &err);
        done *d = (done *)j; /* same size class: reuse the allocation */
        uint64_t token = j->token;
        d->token = token;
        d->next_id = n;
        d->err = err;
        d->ns = now_ns() - t0;

        int wake = 0;
        pthread_mutex_lock(&self->lock);
        d->next = self->results;
        self->results = d;
        if (!self->signalled) {
            self->signalled = 1;
            wake = 1;
        }
        if (wake) {
            /* Outside the lock, as _wake does: the write may switch to the loop's
             * thread at once, whose drain() would then wait for this lock. close()
             * joins these threads before it closes efd, so efd is still ours. */
            pthread_mutex_unlock(&self->lock);
            uint64_t one = 1;
            ssize_t w = write(self->efd, &one, sizeof one);
            (void)w;
            pthread_mutex_lock(&self->lock);
        }
    }
    pthread_mutex_unlock(&self->lock);
    return NULL;
}

static int owned(RoundsObject *self)
{
    if (self->owner != g_forks || self->efd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "Rounds is closed or belongs to another process");
        return 0;
    }
    return 1;
}

static int start_threads(RoundsObject *self)
{
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_BYTES);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with Python's threads */
    int rc = 0, i;
    for (i = 0; i < THREADS && rc == 0; i++)
        rc = pthread_create(&self->threads[i], &attr, worker, self);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    self->started = rc == 0 ? THREADS : i - 1;
    if (rc != 0) {
        errno = rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Rounds_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"overlap", NULL};
    int overlap = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:Rounds", kwlist, &overlap))
        return NULL;
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    RoundsObject *self = (RoundsObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        close(efd);
        return NULL;
    }
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->more, NULL);
    pthread_cond_init(&self->dir_done, NULL);
    self->overlap = overlap;
    self->efd = efd;
    self->owner = g_forks;
    return (PyObject *)self;
}

static void free_lists(RoundsObject *self)
{
    for (job *j = self->head; j != NULL;) {
        job *n = j->next;
        free(j);
        j = n;
    }
    for (done *d = self->results; d != NULL;) {
        done *n = d->next;
        free(d);
        d = n;
    }
    self->head = self->tail = NULL;
    self->results = NULL;
}

/* Waits for the queued rounds to finish (their results are dropped), then frees. */
static void shut(RoundsObject *self)
{
    if (self->efd < 0)
        return;
    pthread_mutex_lock(&self->lock);
    self->stopping = 1;
    pthread_cond_broadcast(&self->more);
    pthread_mutex_unlock(&self->lock);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < self->started; i++)
        pthread_join(self->threads[i], NULL);
    Py_END_ALLOW_THREADS
    self->started = 0;
    free_lists(self);
    close(self->efd);
    self->efd = -1;
}

static void Rounds_dealloc(RoundsObject *self)
{
    if (self->owner == g_forks) {
        shut(self);
        pthread_cond_destroy(&self->more);
        pthread_cond_destroy(&self->dir_done);
        pthread_mutex_destroy(&self->lock);
    } /* else: a forked child's copy; its lock may be held by a thread that is gone */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Rounds_submit(RoundsObject *self, PyObject *args)
{
    unsigned long long token, start;
    int dir_fd;
    if (!PyArg_ParseTuple(args, "KiK:submit", &token, &dir_fd, &start))
        return NULL;
    if (!owned(self))
        return NULL;
    if (self->started == 0 && start_threads(self) < 0)
        return NULL;
    job *j = malloc(sizeof(job) > sizeof(done) ? sizeof(job) : sizeof(done));
    if (j == NULL)
        return PyErr_NoMemory();
    j->next = NULL;
    j->token = token;
    j->start = start;
    j->dir_fd = dir_fd;
    pthread_mutex_lock(&self->lock);
    if (self->tail != NULL)
        self->tail->next = j;
    else
        self->head = j;
    self->tail = j;
    pthread_cond_signal(&self->more);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *Rounds_drain(RoundsObject *self, PyObject *unused)
{
    if (!owned(self))
        return NULL;
    uint64_t count;
    ssize_t r = read(self->efd, &count, sizeof count); /* EAGAIN: nothing was signalled */
    (void)r;
    pthread_mutex_lock(&self->lock);
    done *d = self->results;
    self->results = NULL;
    self->signalled = 0;
    pthread_mutex_unlock(&self->lock);
    /* Newest first: reverse, so results come back in the order the rounds ended. */
    done *ordered = NULL;
    Py_ssize_t n = 0;
    while (d != NULL) {
        done *next = d->next;
        d->next = ordered;
        ordered = d;
        d = next;
        n++;
    }
    PyObject *list = PyList_New(n);
    Py_ssize_t i = 0;
    while (ordered != NULL) {
        done *next = ordered->next;
        if (list != NULL) {
            PyObject *t = Py_BuildValue("(KKiL)", (unsigned long long)ordered->token,
                                        (unsigned long long)ordered->next_id, ordered->err,
                                        (long long)ordered->ns);
            if (t == NULL)
                Py_CLEAR(list);
            else
                PyList_SET_ITEM(list, i++, t);
        }
        free(ordered);
        ordered = next;
    }
    return list;
}

static PyObject *Rounds_fileno(RoundsObject *self, PyObject *unused)
{
    if (!owned(self))
        return NULL;
    return PyLong_FromLong(self->efd);
}

static PyObject *Rounds_close(RoundsObject *self, PyObject *unused)
{
    if (self->owner == g_forks)
        shut(self);
    Py_RETURN_NONE;
}

static PyMethodDef Rounds_methods[] = {
    {"submit", (PyCFunction)Rounds_submit, METH_VARARGS,
     "submit(token, dir_fd, start): queue a round over the open wal/ fd from id start."},
    {"drain", (PyCFunction)Rounds_drain, METH_NOARGS,
     "The rounds finished since the last drain: [(token, next_id, errno, ns)]."},
    {"fileno", (PyCFunction)Rounds_fileno, METH_NOARGS,
     "The eventfd written when a result is ready."},
    {"close", (PyCFunction)Rounds_close, METH_NOARGS,
     "Let the queued rounds finish, stop the threads, close the eventfd."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RoundsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "silo.storage._walsync.Rounds",
    .tp_basicsize = sizeof(RoundsObject),
    .tp_dealloc = (destructor)Rounds_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WAL fsync rounds run on C threads; results through an eventfd.",
    .tp_methods = Rounds_methods,
    .tp_new = Rounds_new,
};

static PyObject *walsync_sync_wal(PyObject *mod, PyObject *args)
{
    unsigned long long start;
    int dir_fd, err;
    if (!PyArg_ParseTuple(args, "iK:sync_wal", &dir_fd, &start))
        return NULL;
    uint64_t n;
    int64_t t0 = now_ns();
    Py_BEGIN_ALLOW_THREADS
    n = round_run(dir_fd, start, &err);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(KiL)", (unsigned long long)n, err, (long long)(now_ns() - t0));
}

static PyMethodDef walsync_functions[] = {
    {"sync_wal", walsync_sync_wal, METH_VARARGS,
     "sync_wal(dir_fd, start) -> (next_id, errno, ns): one round, GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef walsync_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "silo.storage._walsync",
    .m_doc = "WAL fsync rounds of silo.storage.local_sync in C.",
    .m_size = -1,
    .m_methods = walsync_functions,
};

PyMODINIT_FUNC PyInit__walsync(void)
{
    if (PyType_Ready(&RoundsType) < 0)
        return NULL;
    if (pthread_atfork(NULL, NULL, after_fork_child) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&walsync_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RoundsType);
    if (PyModule_AddObject(m, "Rounds", (PyObject *)&RoundsType) < 0) {
        Py_DECREF(&RoundsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
