/*
 * The steady state of a splice, compiled: what one relayed chunk costs once both ends are set up.
 *
 * A Pipe stands in for an endpoint as its transport's protocol while a splice relays (see
 * dataplane/fastpath.py). For each read the event loop hands it, it decrypts (a TLS side: the
 * endpoint's own OpenSSL objects, through its memory BIOs), encrypts for the other side when
 * that side is TLS, and writes to the other side: no Python frame per chunk. The write goes
 * straight to the other side's socket while its transport has nothing queued, so that order
 * and flow control stay the transport's (the rest of a short send goes through it).
 * Everything that is not a plain chunk of data is handed back to the endpoint, which handles it
 * as it always does: the end of input, a lost connection, write flow control, a TLS alert or
 * close_notify (left unread here, so the endpoint's own read meets it), and the first reads of
 * a TLS connection (session tickets, buffers given back).
 *
 * OpenSSL is reached through the entry points native.py found in the libssl the ssl module uses
 * (bind()), so this file needs neither OpenSSL's headers nor linking against it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define RECORD_MAX 16384
#define SCRATCH_SIZE (256 * 1024)
#define OUTGOING_SIZE (SCRATCH_SIZE + 32 * 1024) /* a full scratch of plaintext, as records */
#define SSL_ERROR_WANT_READ 2 /* ssl.h */
#define SSL_SENT_SHUTDOWN 1   /* ssl.h */

typedef int (*ssl_read_ex_f)(void *, void *, size_t, size_t *);
typedef int (*ssl_write_ex_f)(void *, const void *, size_t, size_t *);
typedef int (*ssl_get_error_f)(const void *, int);
typedef void *(*ssl_get_bio_f)(const void *);
typedef int (*bio_write_f)(void *, const void *, int);
typedef int (*bio_read_f)(void *, void *, int);
typedef size_t (*bio_ctrl_pending_f)(void *);
typedef int (*ssl_pending_f)(const void *);
typedef int (*ssl_get_shutdown_f)(const void *);
typedef void (*err_clear_error_f)(void);

static struct {
    ssl_read_ex_f ssl_read_ex;
    ssl_write_ex_f ssl_write_ex;
    ssl_get_error_f ssl_get_error;
    ssl_get_bio_f ssl_get_rbio;
    ssl_get_bio_f ssl_get_wbio;
    bio_write_f bio_write;
    bio_read_f bio_read;
    bio_ctrl_pending_f bio_ctrl_pending;
    ssl_pending_f ssl_pending;
    ssl_get_shutdown_f ssl_get_shutdown;
    err_clear_error_f err_clear_error;
    int bound;
} ossl;

/* Plaintext read from a TLS side, before it is written to the other: one per process (the loop
 * is one thread, and a chunk is written out before the next read). */
static char scratch[SCRATCH_SIZE];
static char outgoing[OUTGOING_SIZE]; /* records on their way from a wbio to a socket */

/* The buffer reads are received into (the TLS endpoint's own, so a read handed back to it is
 * where it expects): set once by use_buffer(), held for the process's life. */
static PyObject *receive_object;
static Py_buffer receive_view;

static PyObject *str_received, *str_sent, *str_relay_ready, *str_buffer_updated,
    *str_data_received, *str_read_plaintext, *str_eof_received, *str_connection_lost,
    *str_pause_writing, *str_resume_writing, *str_write, *str_is_closing,
    *str_get_write_buffer_size, *str_force_close;

/* A pipe made with Pipe.__new__ but never initialised has no endpoint: refuse, do not crash. */
#define REQUIRE_READY(self)                                                                    \
    if ((self)->endpoint == NULL) {                                                            \
        PyErr_SetString(PyExc_RuntimeError, "the Pipe was not initialised");                   \
        return NULL;                                                                           \
    }

typedef struct Pipe {
    PyObject_HEAD
    PyObject *endpoint;     /* the Endpoint this stands in for */
    PyObject *transport;    /* its transport */
    PyObject *clock;        /* a callable for the monotonic time, or NULL: CLOCK_MONOTONIC */
    struct Pipe *peer;      /* the other end's pipe; NULL once detached */
    void *ssl, *rbio, *wbio; /* a TLS side's OpenSSL objects; NULL for a plain side */
    unsigned long long received;           /* plaintext read from this side, in total */
    unsigned long long unsynced_received, unsynced_sent; /* not yet added to the endpoint */
    double last;            /* when data last came from this side */
    int warm;               /* TLS: the endpoint's first-read work is done, reads are ours */
    int fd;                 /* the transport's socket, written directly when it has nothing
                               queued; -1: always through the transport */
} Pipe;

static double
now(Pipe *self)
{
    if (self->clock == NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    PyObject *value = PyObject_CallNoArgs(self->clock);
    if (value == NULL) {
        return -1.0;
    }
    double seconds = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return seconds;
}

/* Add what moved since the last time to the endpoint's own counters (read by Python code that
 * runs next: the end of a connection, a log line). */
static int
add_to(PyObject *endpoint, PyObject *name, unsigned long long *count)
{
    if (*count == 0) {
        return 0;
    }
    PyObject *old = PyObject_GetAttr(endpoint, name);
    if (old == NULL) {
        return -1;
    }
    PyObject *delta = PyLong_FromUnsignedLongLong(*count);
    PyObject *sum = delta ? PyNumber_Add(old, delta) : NULL;
    Py_DECREF(old);
    Py_XDECREF(delta);
    if (sum == NULL) {
        return -1;
    }
    int failed = PyObject_SetAttr(endpoint, name, sum);
    Py_DECREF(sum);
    if (failed == 0) {
        *count = 0;
    }
    return failed;
}

static int
sync_counts(Pipe *self)
{
    if (add_to(self->endpoint, str_received, &self->unsynced_received) < 0) {
        return -1;
    }
    return add_to(self->endpoint, str_sent, &self->unsynced_sent);
}

/* obj.method(chunk), taking over the reference to ``chunk`` (NULL: making it failed). */
static int
call_with(PyObject *obj, PyObject *method, PyObject *chunk)
{
    if (chunk == NULL) {
        return -1;
    }
    PyObject *result = PyObject_CallMethodOneArg(obj, method, chunk);
    Py_DECREF(chunk);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* The connection failed under our own send. The kernel reports such an error once, so the
 * transport would never see it: it is closed with it, as when its own write meets one, and the
 * endpoint learns the cause (a reset right after a TLS 1.3 handshake names a refused client
 * certificate). The bytes go nowhere: the connection is gone. */
static int
lost_under_send(Pipe *self, int failure)
{
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", failure, strerror(failure));
    if (exc == NULL) {
        return -1;
    }
    PyObject *result = PyObject_CallMethodOneArg(self->transport, str_force_close, exc);
    Py_DECREF(exc);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* Put bytes on this side's connection. When the transport has nothing queued (the usual case)
 * they go straight to its socket; what the socket does not take at once, or everything while
 * something is queued, goes through the transport, which keeps the order and applies its flow
 * control. Any other failure of the send turns direct writes off for this side: a lost
 * connection closes the transport with its cause (lost_under_send), anything else (EPIPE after
 * our own shutdown, a shortage of buffers) is left for the transport's write to meet. */
static int
write_out(Pipe *self, const char *data, size_t size, int known_open)
{
    if (self->fd >= 0 && !known_open) {
        PyObject *closing = PyObject_CallMethodNoArgs(self->transport, str_is_closing);
        if (closing == NULL) {
            return -1;
        }
        int is_closing = PyObject_IsTrue(closing);
        Py_DECREF(closing);
        if (is_closing < 0) {
            return -1;
        }
        known_open = !is_closing;
    }
    if (self->fd >= 0 && known_open) {
        PyObject *queued = PyObject_CallMethodNoArgs(self->transport, str_get_write_buffer_size);
        if (queued == NULL) {
            return -1;
        }
        long queued_size = PyLong_AsLong(queued);
        Py_DECREF(queued);
        if (queued_size == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (queued_size == 0) {
            ssize_t sent = send(self->fd, data, size, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (sent > 0) {
                data += sent;
                size -= (size_t)sent;
            }
            else if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                int failure = errno;
                self->fd = -1;
                if (failure == ECONNRESET || failure == ECONNABORTED || failure == ETIMEDOUT ||
                    failure == EHOSTUNREACH || failure == ENETUNREACH) {
                    return lost_under_send(self, failure);
                }
            }
            if (size == 0) {
                return 0;
            }
        }
    }
    return call_with(self->transport, str_write,
                     PyBytes_FromStringAndSize(data, (Py_ssize_t)size));
}

/* Send what OpenSSL wrote to a TLS side's outgoing BIO (``known_open``: the caller saw the
 * transport was not closing; write_out asks again otherwise). */
static int
flush(Pipe *self, int known_open)
{
    while (ossl.bio_ctrl_pending(self->wbio) > 0) {
        int got = ossl.bio_read(self->wbio, outgoing, OUTGOING_SIZE);
        if (got <= 0) {
            return 0;
        }
        if (write_out(self, outgoing, (size_t)got, known_open) < 0) {
            return -1;
        }
    }
    return 0;
}

/* OpenSSL would not take plaintext. After our close_notify (the splice passed on a half-close)
 * nothing more is written, as the endpoint's own write does. Anything else is the endpoint's
 * to meet: the rest goes through its write, which raises as the Python relay does, rather than
 * a chunk going missing from the middle of the stream. */
static int
write_failed(Pipe *self, const char *rest, size_t size, size_t done)
{
    self->unsynced_sent += done;
    if (flush(self, 1) < 0) { /* the records written before the failure */
        return -1;
    }
    if (ossl.ssl_get_shutdown(self->ssl) & SSL_SENT_SHUTDOWN) {
        ossl.err_clear_error();
        return 0;
    }
    return call_with(self->endpoint, str_write, PyBytes_FromStringAndSize(rest, (Py_ssize_t)size));
}

/* Write plaintext to this side (the other side read it). As the endpoint's write does: nothing
 * is written to a transport that is closing. */
static int
send_plain(Pipe *self, const char *data, size_t size)
{
    PyObject *closing = PyObject_CallMethodNoArgs(self->transport, str_is_closing);
    if (closing == NULL) {
        return -1;
    }
    int is_closing = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (is_closing != 0) {
        return is_closing < 0 ? -1 : 0;
    }
    if (self->ssl == NULL) {
        if (write_out(self, data, size, 1) < 0) {
            return -1;
        }
    }
    else {
        size_t done = 0;
        ossl.err_clear_error(); /* nothing stale decides this write's fate */
        while (done < size) {
            size_t written = 0;
            if (ossl.ssl_write_ex(self->ssl, data + done, size - done, &written) != 1) {
                return write_failed(self, data + done, size - done, done);
            }
            done += written;
        }
        if (flush(self, 1) < 0) {
            return -1;
        }
    }
    self->unsynced_sent += size;
    return 0;
}

/* Plaintext that came from this side goes to the other; the connection moved (idle clock). */
static int
deliver(Pipe *self, const char *data, size_t size)
{
    double moment = now(self);
    if (moment < 0 && PyErr_Occurred()) {
        return -1;
    }
    self->last = moment;
    self->received += size;
    self->unsynced_received += size;
    Pipe *peer = self->peer;
    if (peer == NULL) {
        return 0;
    }
    Py_INCREF(peer); /* Python code runs in there: whatever it does, the peer outlives the call */
    int result = send_plain(peer, data, size);
    Py_DECREF(peer);
    return result;
}

/* Bytes the socket gave: relayed, or handed to the endpoint when it has more to do than relay. */
static PyObject *
received_bytes(Pipe *self, const char *data, Py_ssize_t size, PyObject *as_python, PyObject *method)
{
    if (self->ssl == NULL) {
        if (deliver(self, data, (size_t)size) < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (!self->warm) {
        PyObject *ready = PyObject_CallMethodNoArgs(self->endpoint, str_relay_ready);
        if (ready == NULL) {
            return NULL;
        }
        int warm = PyObject_IsTrue(ready);
        Py_DECREF(ready);
        if (warm < 0) {
            return NULL;
        }
        self->warm = warm;
        if (!self->warm) {
            if (sync_counts(self) < 0) {
                return NULL;
            }
            return PyObject_CallMethodOneArg(self->endpoint, method, as_python);
        }
    }
    if (size > 0 && ossl.bio_write(self->rbio, data, (int)size) != (int)size) {
        PyErr_SetString(PyExc_MemoryError, "the TLS input buffer did not take the data");
        return NULL;
    }
    size_t filled = 0;
    int more_for_endpoint = 0;
    ossl.err_clear_error(); /* nothing stale decides these reads' fate */
    for (;;) {
        size_t got = 0;
        if (ossl.ssl_read_ex(self->ssl, scratch + filled, RECORD_MAX, &got) == 1) {
            filled += got;
            if (filled > SCRATCH_SIZE - RECORD_MAX) {
                if (deliver(self, scratch, filled) < 0) {
                    return NULL;
                }
                filled = 0;
            }
            if (ossl.bio_ctrl_pending(self->rbio) == 0 && ossl.ssl_pending(self->ssl) == 0) {
                break; /* all read: no failing read to find that out */
            }
            continue;
        }
        /* Out of records, or something that is not data: the end of input, an alert, an
         * error. That last is left where it is (the error queue too) for the endpoint's own
         * read to meet and explain. */
        more_for_endpoint = ossl.ssl_get_error(self->ssl, 0) != SSL_ERROR_WANT_READ;
        break;
    }
    if (flush(self, 0) < 0 || (filled && deliver(self, scratch, filled) < 0)) {
        if (more_for_endpoint) {
            ossl.err_clear_error(); /* the read's error is not left for another connection */
        }
        return NULL;
    }
    if (more_for_endpoint) {
        if (sync_counts(self) < 0) {
            return NULL;
        }
        return PyObject_CallMethodNoArgs(self->endpoint, str_read_plaintext);
    }
    Py_RETURN_NONE;
}

/* -- the protocol interface ------------------------------------------------------------------- */

static PyObject *
Pipe_get_buffer(Pipe *self, PyObject *sizehint)
{
    REQUIRE_READY(self);
    return Py_NewRef(receive_object);
}

static PyObject *
Pipe_buffer_updated(Pipe *self, PyObject *arg)
{
    REQUIRE_READY(self);
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size < 0 || size > receive_view.len) {
        PyErr_SetString(PyExc_ValueError, "more bytes than the buffer holds");
        return NULL;
    }
    return received_bytes(self, (const char *)receive_view.buf, size, arg, str_buffer_updated);
}

static PyObject *
Pipe_data_received(Pipe *self, PyObject *data)
{
    REQUIRE_READY(self);
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *result =
        received_bytes(self, (const char *)view.buf, view.len, data, str_data_received);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
forward(Pipe *self, PyObject *name, PyObject *arg)
{
    REQUIRE_READY(self);
    if (sync_counts(self) < 0) {
        return NULL;
    }
    if (arg == NULL) {
        return PyObject_CallMethodNoArgs(self->endpoint, name);
    }
    return PyObject_CallMethodOneArg(self->endpoint, name, arg);
}

static PyObject *
Pipe_eof_received(Pipe *self, PyObject *unused)
{
    return forward(self, str_eof_received, NULL);
}

static PyObject *
Pipe_connection_lost(Pipe *self, PyObject *exc)
{
    self->fd = -1; /* the transport closes its socket: the number may be reused */
    return forward(self, str_connection_lost, exc);
}

static PyObject *
Pipe_pause_writing(Pipe *self, PyObject *unused)
{
    return forward(self, str_pause_writing, NULL);
}

static PyObject *
Pipe_resume_writing(Pipe *self, PyObject *unused)
{
    return forward(self, str_resume_writing, NULL);
}

static PyObject *
Pipe_connection_made(Pipe *self, PyObject *transport)
{
    Py_RETURN_NONE; /* a pipe is set on a connected transport */
}

static PyObject *
Pipe_detach(Pipe *self, PyObject *unused)
{
    REQUIRE_READY(self);
    Py_CLEAR(self->peer);
    self->fd = -1;
    if (sync_counts(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
Pipe_traverse(Pipe *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->endpoint);
    Py_VISIT(self->transport);
    Py_VISIT(self->clock);
    Py_VISIT((PyObject *)self->peer);
    return 0;
}

static int
Pipe_clear(Pipe *self)
{
    Py_CLEAR(self->peer);
    Py_CLEAR(self->endpoint);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->clock);
    return 0;
}

static void
Pipe_dealloc(Pipe *self)
{
    PyObject_GC_UnTrack(self);
    Pipe_clear(self);
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* Pipe(endpoint, transport, ssl, clock[, fd]): ``ssl`` is the address of a TLS side's SSL
 * object (0 for a plain side), ``clock`` a callable or None for the system's monotonic clock,
 * ``fd`` the transport's socket when the transport writes it with nothing in between (-1:
 * always write through the transport). */
static int
Pipe_init(Pipe *self, PyObject *args, PyObject *kwargs)
{
    PyObject *endpoint, *transport, *ssl_address, *clock;
    int fd = -1;
    if (!PyArg_ParseTuple(args, "OOOO|i:Pipe", &endpoint, &transport, &ssl_address, &clock, &fd)) {
        return -1;
    }
    if (self->endpoint != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Pipe is made once");
        return -1;
    }
    void *ssl = PyLong_AsVoidPtr(ssl_address);
    if (ssl == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (ssl != NULL && !ossl.bound) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL entry points not bound");
        return -1;
    }
    if (receive_object == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no receive buffer: use_buffer() first");
        return -1;
    }
    self->transport = Py_NewRef(transport);
    self->endpoint = Py_NewRef(endpoint);
    self->clock = clock == Py_None ? NULL : Py_NewRef(clock);
    self->fd = fd;
    if (ssl != NULL) {
        self->ssl = ssl;
        self->rbio = ossl.ssl_get_rbio(ssl);
        self->wbio = ossl.ssl_get_wbio(ssl);
        if (self->rbio == NULL || self->wbio == NULL) {
            PyErr_SetString(PyExc_ValueError, "the SSL object has no memory BIOs");
            return -1;
        }
    }
    double moment = now(self);
    if (moment < 0 && PyErr_Occurred()) {
        return -1;
    }
    self->last = moment;
    return 0;
}

static PyObject *
Pipe_join(Pipe *self, PyObject *other)
{
    REQUIRE_READY(self);
    if (!PyObject_TypeCheck(other, Py_TYPE(self))) {
        PyErr_SetString(PyExc_TypeError, "a Pipe joins a Pipe");
        return NULL;
    }
    Py_XSETREF(self->peer, (Pipe *)Py_NewRef(other));
    Py_RETURN_NONE;
}

static PyMethodDef Pipe_methods[] = {
    {"get_buffer", (PyCFunction)Pipe_get_buffer, METH_O, NULL},
    {"buffer_updated", (PyCFunction)Pipe_buffer_updated, METH_O, NULL},
    {"data_received", (PyCFunction)Pipe_data_received, METH_O, NULL},
    {"eof_received", (PyCFunction)Pipe_eof_received, METH_NOARGS, NULL},
    {"connection_lost", (PyCFunction)Pipe_connection_lost, METH_O, NULL},
    {"connection_made", (PyCFunction)Pipe_connection_made, METH_O, NULL},
    {"pause_writing", (PyCFunction)Pipe_pause_writing, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)Pipe_resume_writing, METH_NOARGS, NULL},
    {"join", (PyCFunction)Pipe_join, METH_O, "Relay what this side reads to ``other``."},
    {"detach", (PyCFunction)Pipe_detach, METH_NOARGS,
     "Stop relaying; the endpoint's counters are brought up to date."},
    {NULL},
};

static PyMemberDef Pipe_members[] = {
    {"received", T_ULONGLONG, offsetof(Pipe, received), READONLY,
     "plaintext bytes read from this side"},
    {"last", T_DOUBLE, offsetof(Pipe, last), READONLY, "when this side last sent data"},
    {"endpoint", T_OBJECT, offsetof(Pipe, endpoint), READONLY, NULL},
    {NULL},
};

static PyType_Slot Pipe_slots[] = {
    {Py_tp_doc, "One end of a compiled splice: the protocol of that end's transport."},
    {Py_tp_init, Pipe_init},
    {Py_tp_dealloc, Pipe_dealloc},
    {Py_tp_traverse, Pipe_traverse},
    {Py_tp_clear, Pipe_clear},
    {Py_tp_methods, Pipe_methods},
    {Py_tp_members, Pipe_members},
    {0, NULL},
};

static PyType_Spec Pipe_spec = {
    .name = "fleetgate.dataplane._relay.Pipe",
    .basicsize = sizeof(Pipe),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Pipe_slots,
};

/* bind(ssl_read_ex, ssl_write_ex, ssl_get_error, ssl_get_rbio, ssl_get_wbio, bio_write,
 *      bio_read, bio_ctrl_pending, ssl_pending, ssl_get_shutdown, err_clear_error): the entry
 *      points' addresses. */
#define ENTRY_POINTS 11
static PyObject *
relay_bind(PyObject *module, PyObject *args)
{
    PyObject *a[ENTRY_POINTS];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOO:bind", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5],
                          &a[6], &a[7], &a[8], &a[9], &a[10])) {
        return NULL;
    }
    void *p[ENTRY_POINTS];
    for (int i = 0; i < ENTRY_POINTS; i++) {
        p[i] = PyLong_AsVoidPtr(a[i]);
        if (p[i] == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "a null entry point");
            }
            return NULL;
        }
    }
    ossl.ssl_read_ex = (ssl_read_ex_f)p[0];
    ossl.ssl_write_ex = (ssl_write_ex_f)p[1];
    ossl.ssl_get_error = (ssl_get_error_f)p[2];
    ossl.ssl_get_rbio = (ssl_get_bio_f)p[3];
    ossl.ssl_get_wbio = (ssl_get_bio_f)p[4];
    ossl.bio_write = (bio_write_f)p[5];
    ossl.bio_read = (bio_read_f)p[6];
    ossl.bio_ctrl_pending = (bio_ctrl_pending_f)p[7];
    ossl.ssl_pending = (ssl_pending_f)p[8];
    ossl.ssl_get_shutdown = (ssl_get_shutdown_f)p[9];
    ossl.err_clear_error = (err_clear_error_f)p[10];
    ossl.bound = 1;
    Py_RETURN_NONE;
}

static PyObject *
relay_use_buffer(PyObject *module, PyObject *buffer)
{
    if (receive_object != NULL) {
        if (buffer == receive_object) {
            Py_RETURN_NONE;
        }
        PyErr_SetString(PyExc_RuntimeError, "the receive buffer is set once");
        return NULL;
    }
    if (PyObject_GetBuffer(buffer, &receive_view, PyBUF_WRITABLE) < 0) {
        return NULL;
    }
    receive_object = Py_NewRef(buffer);
    Py_RETURN_NONE;
}

static PyMethodDef relay_functions[] = {
    {"use_buffer", relay_use_buffer, METH_O,
     "Receive every pipe's reads into this (writable) buffer; set once."},
    {"bind", relay_bind, METH_VARARGS, "Hand over the OpenSSL entry points (addresses)."},
    {NULL},
};

static int
relay_exec(PyObject *module)
{
#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL) {                                    \
        return -1;                                                                             \
    }
    INTERN(str_received, "received");
    INTERN(str_sent, "sent");
    INTERN(str_relay_ready, "relay_ready");
    INTERN(str_buffer_updated, "buffer_updated");
    INTERN(str_data_received, "data_received");
    INTERN(str_read_plaintext, "_read_plaintext");
    INTERN(str_eof_received, "eof_received");
    INTERN(str_connection_lost, "connection_lost");
    INTERN(str_pause_writing, "pause_writing");
    INTERN(str_resume_writing, "resume_writing");
    INTERN(str_write, "write");
    INTERN(str_get_write_buffer_size, "get_write_buffer_size");
    INTERN(str_force_close, "_force_close");
    INTERN(str_is_closing, "is_closing");
#undef INTERN
    PyObject *type = PyType_FromModuleAndSpec(module, &Pipe_spec, NULL);
    if (type == NULL) {
        return -1;
    }
    int failed = PyModule_AddObjectRef(module, "Pipe", type);
    Py_DECREF(type);
    return failed;
}

static PyModuleDef_Slot relay_slots[] = {
    {Py_mod_exec, relay_exec},
    /* The OpenSSL entry points and the receive buffer are the process's, not per interpreter. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
    {0, NULL},
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fleetgate.dataplane._relay",
    .m_doc = "The steady state of a splice, compiled (see fastpath.py).",
    .m_size = 0,
    .m_methods = relay_functions,
    .m_slots = relay_slots,
};

PyMODINIT_FUNC
PyInit__relay(void)
{
    return PyModuleDef_Init(&relay_module);
}
