/*
 * A relay's whole connections, compiled: accept a plain TCP connection, connect to the
 * destination, run the TLS handshake, relay both ways, end. What `fleetgate connect` does for
 * each connection, with no Python frame and no event-loop object per connection: Python is
 * called once per connection, when it ends (to log and count it).
 *
 * A Core owns an epoll instance; the event loop watches its descriptor and calls run() when it
 * has events, and expire() twice a second (timeouts). The sockets are edge-triggered: each side
 * remembers whether it may still be read or written, and a direction moves until its source
 * has nothing more or its sink takes nothing more (back-pressure: what a sink did not take is
 * kept, and its source is not read again until the sink took it).
 *
 * TLS goes through memory BIOs, as in _relay.c: the socket is read and written here (one read
 * per chunk of records, one send per chunk written), OpenSSL only encrypts and decrypts. The
 * SSL_CTX comes from the ssl module's context (its verification settings and hooks apply); the
 * connection's SSL is made here: server name (SNI and the name checked), the client identity,
 * the session to resume. OpenSSL is reached through the entry points native.py found (bind()),
 * so this file needs neither OpenSSL's headers nor linking against it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)            /* one read from a socket */
#define OUTGOING_SIZE (CHUNK + 32 * 1024) /* a chunk of plaintext, as records */
#define BATCH 256                     /* events taken per run() */
#define ACCEPTS_PER_EVENT 64          /* connections accepted per listener event */
#define RECORD_MAX 16384
#define MAX_ADDRESSES 8               /* of the destination's name, tried in order */
#define TURN_CHUNKS 16 /* chunks (up to 4 MiB) a direction moves before the other connections */
#define REST_AFTER_S 0.5              /* quiet this long: the record buffers are given back */
/* This many fewer busy connections (being set up or relaying) than at the last peak, and at most
 * half as many: the burst is over, and what it used goes back to the system (malloc_trim). */
#define TRIM_AFTER_QUIET 64
#define TRIM_EVERY_S 10.0 /* at most this often (devices that all report on the minute) */

#define SSL_ERROR_WANT_READ 2        /* ssl.h */
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_ZERO_RETURN 6
#define SSL_SENT_SHUTDOWN 1
#define SSL_CTRL_MODE 33
#define SSL_CTRL_SET_TLSEXT_HOSTNAME 55
#define TLSEXT_NAMETYPE_host_name 0
#define SSL_MODE_ENABLE_PARTIAL_WRITE 0x1
#define SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2

static struct {
    void *(*ssl_new)(void *);
    void (*ssl_free)(void *);
    void (*ssl_set_bio)(void *, void *, void *);
    int (*bio_free)(void *);
    void *(*bio_new)(const void *);
    const void *(*bio_s_mem)(void);
    void (*ssl_set_connect_state)(void *);
    int (*ssl_do_handshake)(void *);
    int (*ssl_read_ex)(void *, void *, size_t, size_t *);
    int (*ssl_write_ex)(void *, const void *, size_t, size_t *);
    int (*ssl_get_error)(const void *, int);
    int (*bio_write)(void *, const void *, int);
    int (*bio_read)(void *, void *, int);
    size_t (*bio_ctrl_pending)(void *);
    int (*ssl_shutdown)(void *);
    long (*ssl_ctrl)(void *, int, long, void *);
    int (*ssl_set1_host)(void *, const char *);
    void *(*ssl_get0_param)(void *);
    int (*param_set1_ip_asc)(void *, const char *);
    int (*ssl_set_session)(void *, void *);
    void *(*ssl_get1_session)(void *);
    int (*session_is_resumable)(const void *);
    void (*session_free)(void *);
    long (*ssl_get_verify_result)(const void *);
    int (*ssl_use_cert_and_key)(void *, void *, void *, void *, int);
    int (*ssl_get_shutdown)(const void *);
    void (*ssl_set_shutdown)(void *, int);
    unsigned long (*err_peek_last_error)(void);
    void (*err_clear_error)(void);
    const char *(*err_reason_error_string)(unsigned long);
    int (*ssl_session_reused)(const void *);
    int (*ssl_free_buffers)(void *);
    void *(*ssl_get_rbio)(const void *);
    void *(*ssl_get_wbio)(const void *);
    int bound;
} ossl;

/* Whether quiet connections give their record buffers back (not on an OpenSSL where
 * SSL_free_buffers is unsafe: native.FREE_BUFFERS, set through bind()). */
static int free_buffers_allowed = 1;

/* One process's buffers (the loop is one thread, and a chunk is passed on before the next). */
static char incoming[CHUNK];          /* read from a socket */
static char plain[CHUNK];             /* decrypted, on its way to the device */
static char outgoing[OUTGOING_SIZE];  /* records on their way to the destination */

enum { CONNECTING, HANDSHAKE, RELAYING, ENDED };
/* The queues a connection waits in for its timeouts, each in the order they come due (see
 * expire()): being set up (by start), relaying (by last activity), resting (quiet, its record
 * buffers given back; by last activity, one queue per idle timeout, so that the head of each is
 * the first of its queue to time out). Idle timeouts are few (one per listener); past
 * RESTING_KINDS distinct ones, the rest share the last queue, which is walked whole. */
#define RESTING_KINDS 16
enum { QUEUE_NONE, QUEUE_SETUP, QUEUE_ACTIVE, QUEUE_RESTING };
#define QUEUE_MIXED (QUEUE_RESTING + RESTING_KINDS)
#define QUEUES (QUEUE_MIXED + 1)
enum { SIDE_DEVICE = 0, SIDE_UPSTREAM = 1, SIDE_LISTENER = 2 };

struct Conn;

/* What an epoll event points at: a side of a connection, or a listener. */
typedef struct Handle {
    struct Conn *conn;
    int side;
    int fd;
} Handle;

/* Bytes a socket did not take yet: the source of that direction is not read until they went. */
typedef struct Pending {
    char *data;
    size_t size, offset;
} Pending;

typedef struct Conn {
    struct Conn *prev, *next; /* the core's live list (shutdown, the collector) */
    struct Conn *due_prev, *due_next; /* its queue (timeouts) */
    int queue;
    Handle device, upstream;
    void *ssl, *rbio, *wbio;
    int state;
    /* (not bit-fields: passed by address) */
    unsigned device_readable, device_writable, upstream_readable, upstream_writable;
    unsigned device_eof : 1, upstream_eof : 1, close_notify_sent : 1,
        upstream_shut : 1, device_shut : 1, session_done : 1, resumed : 1, resting : 1, read_since_handshake : 1,
        device_hup : 1, upstream_hup : 1; /* the peer's FIN (or an error) is queued: a short read
                                             does not mean there is nothing left to read */
    Pending to_upstream, to_device;
    int attempt;             /* which of the destination's addresses is being tried */
    struct Conn *posted_next; /* on the core's posted list (posted set) */
    int posted;
    unsigned long long up_bytes, down_bytes;
    double started, last;
    double idle_timeout;
    /* A connection set up in Python and handed over (adopt()): its SSL belongs to `owner`
     * (kept alive until the connection is freed, never freed here); its end goes to its own
     * `on_end`; `on_read`, until it returns True, is called after each batch of records read
     * (the session kept for the next connections, once the ticket came). */
    int adopted;
    /* A device that speaks TLS (a tls, mtls or psk listener): its server side, handshaken in
     * Python, with memory BIOs; NULL for a plain device. */
    void *dssl, *drbio, *dwbio;
    int device_notify_sent; /* our close_notify to the device is written (or none is due) */
    int device_clean_eof;   /* the device's close_notify came */
    int upstream_cut;       /* the destination's FIN came without its close_notify */
    int alerted;            /* the device was sent a TLS alert: close gently, so it arrives */
    char *device_failure;   /* the device's TLS failure, after the data decrypted before it */
    unsigned long long key;
    int fresh_records; /* records came (or were in the BIO at adoption) since on_read ran */
    PyObject *owner, *on_end, *on_read;
    char source[INET6_ADDRSTRLEN];
} Conn;

typedef struct Queue {
    Conn *head, *tail;
} Queue;

typedef struct {
    PyObject_HEAD
    int epfd;
    Queue queues[QUEUES];
    Py_ssize_t queue_length[QUEUES];
    Py_ssize_t busy_peak; /* most busy connections (set up or relaying) since the last trim */
    Py_ssize_t held_peak; /* most connections in any state since the last trim */
    double trimmed_at;
    unsigned long long trims;
    double resting_timeout[RESTING_KINDS]; /* the idle timeout of each resting queue */
    int resting_kinds;
    /* Adopted connections by key: slot (low 32 bits) and generation (high), so cut() finds one
     * at once and a key of an ended connection finds nothing. */
    struct Conn **slots;
    unsigned *free_slots;
    unsigned slot_count, free_count, slot_capacity;
    PyObject *context;   /* the ssl.SSLContext whose SSL_CTX is ctx (kept alive) */
    void *ctx;
    PyObject *identity;  /* what owns cert/key/chain (kept alive), or None */
    void *cert, *key, *chain;
    char *server_name;
    int name_is_ip;
    int resume;
    void *session;
    double session_at;
    struct sockaddr_storage addresses[MAX_ADDRESSES]; /* the destination's, tried in order */
    socklen_t address_sizes[MAX_ADDRESSES];
    int address_count;
    int calling;         /* inside a callback into Python: no re-entry, nothing freed */
    double connect_timeout, idle_timeout;
    PyObject *on_end;    /* called once per connection that ends */
    PyObject *clock;     /* a callable for the monotonic time, or NULL: CLOCK_MONOTONIC */
    Conn *live;          /* every connection not ended */
    Conn *ended;         /* ended during this run(), freed at its end */
    Conn *posted;        /* connections that used up their turn with more to read */
    int turn_chunks;     /* chunks a direction moves per turn before the others' events */
    Handle *listeners[8];
    int listener_count;
    int listeners_paused; /* out of descriptors: accepting again at the next expire() */
    Py_ssize_t count;
    unsigned long long accepted;
    unsigned long long adopted;      /* connections handed over in all (their keys) */
    unsigned long long turns_posted; /* times a direction used up its turn */
} Core;

static double
now(Core *core)
{
    if (core->clock == NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    }
    core->calling++;
    PyObject *value = PyObject_CallNoArgs(core->clock);
    double seconds = value ? PyFloat_AsDouble(value) : -1.0;
    Py_XDECREF(value);
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(core->clock);
        seconds = 0.0;
    }
    core->calling--;
    return seconds;
}

/* -- timeouts: each connection in the queue of what it waits for ------------------------------- */

static void
dequeue(Core *core, Conn *c)
{
    if (c->queue == QUEUE_NONE) {
        return;
    }
    Queue *q = &core->queues[c->queue];
    if (c->due_prev != NULL) {
        c->due_prev->due_next = c->due_next;
    }
    else {
        q->head = c->due_next;
    }
    if (c->due_next != NULL) {
        c->due_next->due_prev = c->due_prev;
    }
    else {
        q->tail = c->due_prev;
    }
    c->due_prev = c->due_next = NULL;
    core->queue_length[c->queue]--;
    c->queue = QUEUE_NONE;
}

/* To the back of a queue: it comes due after every connection already in it. */
static void
enqueue(Core *core, Conn *c, int queue)
{
    dequeue(core, c);
    Queue *q = &core->queues[queue];
    c->due_prev = q->tail;
    c->due_next = NULL;
    if (q->tail != NULL) {
        q->tail->due_next = c;
    }
    else {
        q->head = c;
    }
    q->tail = c;
    c->queue = queue;
    core->queue_length[queue]++;
    Py_ssize_t busy = core->queue_length[QUEUE_SETUP] + core->queue_length[QUEUE_ACTIVE];
    if (busy > core->busy_peak) {
        core->busy_peak = busy;
    }
}

/* After a burst (many connections set up at once, a reconnect storm), the memory their
 * handshakes and record buffers used is free but still the process's: malloc keeps it.
 * Once the burst is over, it goes back to the system; so does what many connections that
 * ended held (a fleet gone at once: an outage, a drain), quiet ones included. Not in a
 * steady state, where the buffers freed are taken again at once. */
static int
fell_after_peak(Py_ssize_t peak, Py_ssize_t now_held)
{
    return peak - now_held >= TRIM_AFTER_QUIET && now_held * 2 <= peak;
}

/* Whether a trim is due (perhaps not yet: at most every TRIM_EVERY_S). */
static int
trim_due(Core *core)
{
    Py_ssize_t busy = core->queue_length[QUEUE_SETUP] + core->queue_length[QUEUE_ACTIVE];
    return fell_after_peak(core->busy_peak, busy) || fell_after_peak(core->held_peak, core->count);
}

static void
trim_after_burst(Core *core, double moment)
{
    if (!trim_due(core) || moment - core->trimmed_at < TRIM_EVERY_S) {
        return;
    }
    core->busy_peak = core->queue_length[QUEUE_SETUP] + core->queue_length[QUEUE_ACTIVE];
    core->held_peak = core->count;
    core->trimmed_at = moment;
#ifdef __GLIBC__
    malloc_trim(0);
    core->trims++;
#endif
}

/* The resting queue for a connection's idle timeout. */
static int
resting_queue(Core *core, double idle_timeout)
{
    for (int k = 0; k < core->resting_kinds; k++) {
        if (core->resting_timeout[k] == idle_timeout) {
            return QUEUE_RESTING + k;
        }
    }
    if (core->resting_kinds == RESTING_KINDS) {
        return QUEUE_MIXED;
    }
    core->resting_timeout[core->resting_kinds] = idle_timeout;
    return QUEUE_RESTING + core->resting_kinds++;
}

/* Bytes moved: its idle deadline moves, and it is not resting. O(1), so expire() looks only at
 * the connections that have come due. */
static void
touch(Core *core, Conn *c)
{
    c->last = now(core);
    c->resting = 0;
    if (core->queues[QUEUE_ACTIVE].tail != c) {
        enqueue(core, c, QUEUE_ACTIVE);
    }
}

/* -- the end of a connection ------------------------------------------------------------------ */

/* Out of the epoll set, then closed. Closing alone is not enough: an adopted connection's
 * sockets are duplicates, and the epoll entry lives as long as any descriptor of the socket
 * does (the event loop's, until it closes it), still pointing at this connection. */
static void
forget_socket(Core *core, int *fd)
{
    if (*fd >= 0) {
        epoll_ctl(core->epfd, EPOLL_CTL_DEL, *fd, NULL);
        close(*fd);
        *fd = -1;
    }
}

/* An adopted connection's key finds nothing from now on. */
static void
release_slot(Core *core, Conn *c)
{
    if (!c->adopted || c->key == 0) {
        return;
    }
    unsigned slot = (unsigned)(c->key & 0xffffffffu);
    if (slot < core->slot_count && core->slots[slot] == c) {
        core->slots[slot] = NULL;
        core->free_slots[core->free_count++] = slot;
    }
    c->key = 0;
}

/* A slot for a new adopted connection: its key (0 when out of memory). */
static unsigned long long
take_slot(Core *core, Conn *c)
{
    unsigned slot;
    if (core->free_count > 0) {
        slot = core->free_slots[--core->free_count];
    }
    else {
        if (core->slot_count == core->slot_capacity) {
            unsigned capacity = core->slot_capacity ? core->slot_capacity * 2 : 1024;
            Conn **slots = realloc(core->slots, capacity * sizeof *slots);
            if (slots == NULL) {
                return 0;
            }
            core->slots = slots;
            unsigned *free_slots = realloc(core->free_slots, capacity * sizeof *free_slots);
            if (free_slots == NULL) {
                return 0;
            }
            core->free_slots = free_slots;
            core->slot_capacity = capacity;
        }
        slot = core->slot_count++;
    }
    core->slots[slot] = c;
    return ((unsigned long long)++core->adopted << 32) | slot;
}

/* Tell Python how it ended: on_end(outcome, source, verify_code, reason, detail, up, down). */
static void
report(Core *core, Conn *c, const char *outcome, long verify_code, const char *reason,
       const char *detail)
{
    PyObject *on_end = c->adopted ? c->on_end : core->on_end;
    if (on_end == NULL || core->on_end == NULL) {
        return; /* the Core is being torn down */
    }
    core->calling++; /* (until every Python call of this report is over) */
    PyObject *result = PyObject_CallFunction(on_end, "sslssKK", outcome, c->source, verify_code,
                                             reason, detail, c->up_bytes, c->down_bytes);
    if (result == NULL) {
        PyErr_WriteUnraisable(on_end);
    }
    Py_XDECREF(result);
    core->calling--;
}

/* An adopted connection's read hook, after a batch of records was read: dropped once it says
 * it is done (or fails). */
static void
after_read(Core *core, Conn *c)
{
    core->calling++;
    PyObject *result = PyObject_CallFunction(c->on_read, "K", c->down_bytes);
    int done = result == NULL ? 1 : PyObject_IsTrue(result);
    if (result == NULL || done < 0) {
        PyErr_WriteUnraisable(c->on_read);
        done = 1;
    }
    Py_XDECREF(result);
    if (done) {
        Py_CLEAR(c->on_read);
    }
    core->calling--;
}

static void
send_records(Conn *c);
static int
send_device_records(Conn *c);

/* End a connection: report it, close both sockets (after a close_notify if the handshake was
 * done and none was sent), move it to the ended list (freed after this run(): later events of
 * the same batch may still point at it). */
static void
end(Core *core, Conn *c, const char *outcome, long verify_code, const char *reason,
    const char *detail)
{
    if (c->state == ENDED) {
        return;
    }
    int clean = strcmp(outcome, "closed") == 0 || strcmp(outcome, "idle_timeout") == 0 ||
                strcmp(outcome, "shutdown") == 0;
    if (clean && c->state == RELAYING && !c->close_notify_sent && !c->upstream_shut) {
        /* (only on a clean end: a cut stream is never passed on as a complete one) */
        c->close_notify_sent = 1;
        ossl.ssl_shutdown(c->ssl);
        ossl.err_clear_error();
        send_records(c); /* best effort: what the socket takes at once */
    }
    if (clean && c->dssl != NULL && !c->device_notify_sent && c->device.fd >= 0) {
        c->device_notify_sent = 1;
        ossl.ssl_shutdown(c->dssl);
        ossl.err_clear_error();
        send_device_records(c); /* best effort: what the socket takes at once */
    }
    if (!clean && !c->alerted && c->device.fd >= 0) {
        /* Refused, or cut: the device gets a reset, never an end it could take for a
         * complete answer (what it was still owed is lost with the connection). */
        struct linger abort_now = {1, 0};
        int one = 1;
        /* What was relayed before the failure goes out first: setting TCP_NODELAY pushes what
         * the kernel still holds back (autocorking), which the reset would otherwise drop. */
        setsockopt(c->device.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(c->device.fd, SOL_SOCKET, SO_LINGER, &abort_now, sizeof abort_now);
    }
    if (c->ssl != NULL) {
        /* A connection ended without the peer's close_notify must not make its session
         * unresumable for the next ones (see native.keep_session_resumable). */
        ossl.ssl_set_shutdown(c->ssl, ossl.ssl_get_shutdown(c->ssl) | SSL_SENT_SHUTDOWN);
    }
    c->state = ENDED;
    dequeue(core, c);
    release_slot(core, c);
    forget_socket(core, &c->device.fd);
    forget_socket(core, &c->upstream.fd);
    /* off the live list, onto the ended one */
    if (c->prev != NULL) {
        c->prev->next = c->next;
    }
    else {
        core->live = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    c->prev = NULL;
    c->next = core->ended;
    core->ended = c;
    core->count--;
    report(core, c, outcome, verify_code, reason, detail);
}

static void
free_conn(Conn *c)
{
    if (c->ssl != NULL && !c->adopted) {
        ossl.ssl_free(c->ssl); /* frees both BIOs */
    }
    free(c->to_upstream.data);
    free(c->to_device.data);
    free(c->device_failure);
    Py_XDECREF(c->on_read);
    Py_XDECREF(c->on_end);
    Py_XDECREF(c->owner); /* last: it may free the SSL */
    free(c);
}

static void
free_ended(Core *core)
{
    if (core->calling) {
        return; /* the outermost call frees them */
    }
    for (Conn **link = &core->posted; *link != NULL;) { /* the ended leave the posted list */
        Conn *c = *link;
        if (c->state == ENDED) {
            *link = c->posted_next;
            c->posted = 0;
        }
        else {
            link = &c->posted_next;
        }
    }
    while (core->ended != NULL) {
        Conn *c = core->ended;
        core->ended = c->next;
        free_conn(c);
    }
}

/* A direction used up its turn with more to read: come back to it after the events waiting
 * now (edge-triggered, no new event would come for what is already there). */
static void
post(Core *core, Conn *c)
{
    core->turns_posted++;
    if (!c->posted) {
        c->posted = 1;
        c->posted_next = core->posted;
        core->posted = c;
    }
}

/* A socket error while relaying, named for the side it came from. */
static void
lost(Core *core, Conn *c, int side, int error)
{
    end(core, c, side == SIDE_DEVICE ? "device_lost" : "destination_lost", 0, "",
        strerror(error));
}

/* -- sending ------------------------------------------------------------------------------------ */

/* Keep what a socket did not take. */
static int
keep(Pending *pending, const char *data, size_t size)
{
    char *copy = malloc(size);
    if (copy == NULL) {
        return -1;
    }
    memcpy(copy, data, size);
    pending->data = copy;
    pending->size = size;
    pending->offset = 0;
    return 0;
}

/* send() what it takes; 0: all sent, 1: some left (kept; *writable cleared), -1: errno. */
static int
send_or_keep(int fd, const char *data, size_t size, Pending *pending, unsigned *writable)
{
    while (size > 0) {
        ssize_t sent = send(fd, data, size, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                return -1;
            }
            *writable = 0;
            if (keep(pending, data, size) < 0) {
                errno = ENOMEM;
                return -1;
            }
            return 1;
        }
        data += sent;
        size -= (size_t)sent;
    }
    return 0;
}

/* Send what was kept; 0: nothing left, 1: still some, -1: errno. */
static int
send_pending(int fd, Pending *pending, unsigned *writable)
{
    while (pending->data != NULL) {
        ssize_t sent = send(fd, pending->data + pending->offset, pending->size - pending->offset,
                            MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                *writable = 0;
                return 1;
            }
            return -1;
        }
        pending->offset += (size_t)sent;
        if (pending->offset == pending->size) {
            free(pending->data);
            pending->data = NULL;
            pending->size = pending->offset = 0;
        }
    }
    return 0;
}

/* Send what a direction kept, if its socket may take it; 0: nothing kept any more, 1: some still
 * kept, -1: errno. */
static int
resend(int fd, Pending *pending, unsigned *writable)
{
    if (pending->data == NULL) {
        return 0;
    }
    if (!*writable) {
        return 1;
    }
    return send_pending(fd, pending, writable);
}

static int upstream_failed; /* errno of the last failed send_records, 0 if none */

/* Move what OpenSSL wrote to an outgoing BIO onto its socket, keeping what the socket does not
 * take (and leaving the rest in the BIO until that went): 0 all went, 1 some is kept, -1 a
 * failure (errno). */
static int
flush_records(void *bio, int fd, Pending *pending, unsigned *writable)
{
    while (ossl.bio_ctrl_pending(bio) > 0) {
        if (pending->data != NULL) {
            return 1;
        }
        int got = ossl.bio_read(bio, outgoing, OUTGOING_SIZE);
        if (got <= 0) {
            return 0;
        }
        int sent = send_or_keep(fd, outgoing, (size_t)got, pending, writable);
        if (sent != 0) {
            return sent;
        }
    }
    return 0;
}

/* The destination's records onto its socket; a failure is left in upstream_failed. */
static void
send_records(Conn *c)
{
    upstream_failed = 0;
    if (flush_records(c->wbio, c->upstream.fd, &c->to_upstream, &c->upstream_writable) < 0) {
        upstream_failed = errno ? errno : EIO;
    }
}

/* -- the handshake ------------------------------------------------------------------------------ */

static void
name_failure_of(void *ssl, char *reason, size_t size, long *verify_code)
{
    *verify_code = ossl.ssl_get_verify_result(ssl);
    unsigned long error = ossl.err_peek_last_error();
    const char *text = error ? ossl.err_reason_error_string(error) : NULL;
    size_t i = 0;
    /* OpenSSL's reason text, as the ssl module names it: "wrong version number" is
     * WRONG_VERSION_NUMBER */
    for (; text != NULL && text[i] != '\0' && i + 1 < size; i++) {
        char ch = text[i];
        reason[i] = ch == ' ' ? '_' : (ch >= 'a' && ch <= 'z') ? (char)(ch - 'a' + 'A') : ch;
    }
    reason[i] = '\0';
    ossl.err_clear_error();
}

static void
name_the_failure(Conn *c, char *reason, size_t size, long *verify_code)
{
    name_failure_of(c->ssl, reason, size, verify_code);
}

static void relay(Core *core, Conn *c);
static void dial(Core *core, Conn *c);

/* One read from a socket into `incoming`: > 0 its size, 0 the peer's end, -1 nothing more for
 * now (*readable cleared), -2 a failure (errno). A short read means drained, unless the peer's
 * FIN or an error is queued behind it (hup): edge-triggered, new data is a new event. */
static ssize_t
receive(int fd, unsigned *readable, int hup)
{
    for (;;) {
        ssize_t got = recv(fd, incoming, CHUNK, 0);
        if (got > 0) {
            if ((size_t)got < CHUNK && !hup) {
                *readable = 0;
            }
            return got;
        }
        if (got == 0) {
            return 0;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            *readable = 0;
            return -1;
        }
        if (errno != EINTR) {
            return -2;
        }
    }
}

static void
step_handshake(Core *core, Conn *c)
{
    int left = resend(c->upstream.fd, &c->to_upstream, &c->upstream_writable);
    if (left < 0) {
        end(core, c, "handshake_failed", 0, "", strerror(errno));
        return;
    }
    if (left > 0) {
        return; /* the last flight did not all go at once */
    }
    for (;;) {
        ossl.err_clear_error();
        int done = ossl.ssl_do_handshake(c->ssl);
        int error = done == 1 ? 0 : ossl.ssl_get_error(c->ssl, done);
        if (done != 1 && error != SSL_ERROR_WANT_READ && error != SSL_ERROR_WANT_WRITE) {
            char reason[96];
            long verify_code;
            name_the_failure(c, reason, sizeof reason, &verify_code);
            send_records(c); /* the alert, so the server knows why */
            end(core, c, "handshake_failed", verify_code, reason,
                reason[0] ? reason : "the handshake failed");
            return;
        }
        send_records(c);
        if (upstream_failed) {
            end(core, c, "handshake_failed", 0, "", strerror(upstream_failed));
            return;
        }
        if (done == 1) {
            c->state = RELAYING;
            c->resumed = ossl.ssl_session_reused(c->ssl) == 1;
            touch(core, c);
            if (!core->resume || c->last - core->session_at < 1.0) {
                c->session_done = 1; /* refreshed at most once a second */
            }
            relay(core, c);
            return;
        }
        if (!c->upstream_readable) {
            return; /* the server's next flight wakes us */
        }
        ssize_t got = receive(c->upstream.fd, &c->upstream_readable, c->upstream_hup);
        if (got == -1) {
            return;
        }
        if (got <= 0) {
            end(core, c, "handshake_failed", 0, "",
                got == 0 ? "the destination closed during the handshake" : strerror(errno));
            return;
        }
        if (ossl.bio_write(c->rbio, incoming, (int)got) != (int)got) {
            ossl.err_clear_error();
            end(core, c, "handshake_failed", 0, "", "out of memory for records");
            return;
        }
    }
}

static void
start_tls(Core *core, Conn *c)
{
    c->ssl = ossl.ssl_new(core->ctx);
    if (c->ssl == NULL) {
        ossl.err_clear_error();
        end(core, c, "tls_setup", 0, "", "out of memory for a TLS connection");
        return;
    }
    c->rbio = ossl.bio_new(ossl.bio_s_mem());
    c->wbio = ossl.bio_new(ossl.bio_s_mem());
    if (c->rbio == NULL || c->wbio == NULL) {
        if (c->rbio != NULL) {
            ossl.bio_free(c->rbio);
        }
        if (c->wbio != NULL) {
            ossl.bio_free(c->wbio);
        }
        c->rbio = c->wbio = NULL;
        ossl.err_clear_error();
        end(core, c, "tls_setup", 0, "", "out of memory for a TLS connection");
        return;
    }
    ossl.ssl_set_bio(c->ssl, c->rbio, c->wbio);
    ossl.ssl_set_connect_state(c->ssl);
    ossl.ssl_ctrl(c->ssl, SSL_CTRL_MODE,
                  SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
    int configured = 1;
    if (core->server_name != NULL) {
        if (core->name_is_ip) {
            configured = ossl.param_set1_ip_asc(ossl.ssl_get0_param(c->ssl), core->server_name);
        }
        else {
            configured =
                ossl.ssl_ctrl(c->ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
                              core->server_name) == 1 &&
                ossl.ssl_set1_host(c->ssl, core->server_name) == 1;
        }
    }
    if (configured && core->cert != NULL) {
        configured = ossl.ssl_use_cert_and_key(c->ssl, core->cert, core->key, core->chain, 1);
    }
    if (configured && core->resume && core->session != NULL) {
        configured = ossl.ssl_set_session(c->ssl, core->session);
    }
    if (configured != 1) {
        ossl.err_clear_error();
        end(core, c, "tls_setup", 0, "", "OpenSSL refused the connection's settings");
        return;
    }
    c->state = HANDSHAKE;
    step_handshake(core, c);
}

/* The destination's socket became writable while connecting: connected, or failed. */
static void
connected(Core *core, Conn *c)
{
    int error = 0;
    socklen_t size = sizeof error;
    if (getsockopt(c->upstream.fd, SOL_SOCKET, SO_ERROR, &error, &size) < 0) {
        error = errno;
    }
    if (error == EINPROGRESS || error == EALREADY) {
        return;
    }
    struct sockaddr_storage peer;
    socklen_t peer_size = sizeof peer;
    if (error == 0 && getpeername(c->upstream.fd, (struct sockaddr *)&peer, &peer_size) < 0) {
        return; /* not connected yet (an event of an earlier attempt's socket) */
    }
    if (error != 0) {
        if (c->attempt + 1 < core->address_count) {
            close(c->upstream.fd); /* (leaves the epoll set with it) */
            c->upstream.fd = -1;
            c->attempt++;
            dial(core, c);
            return;
        }
        end(core, c, "connect_failed", 0, "", strerror(error));
        return;
    }
    start_tls(core, c);
}

/* -- relaying ----------------------------------------------------------------------------------- */

/* Keep the destination's session for the next connections once it can be resumed (TLS 1.3:
 * its ticket comes after the handshake, with the first records read). */
static void
take_session(Core *core, Conn *c)
{
    if (c->resumed && !c->read_since_handshake) {
        return; /* the session resumed is the one kept: wait for the new ticket */
    }
    void *session = ossl.ssl_get1_session(c->ssl);
    if (session == NULL) {
        return;
    }
    if (!ossl.session_is_resumable(session)) {
        ossl.session_free(session);
        return;
    }
    if (core->session != NULL) {
        ossl.session_free(core->session);
    }
    core->session = session;
    core->session_at = c->last;
    c->session_done = 1;
}

/* -- a device that speaks TLS ------------------------------------------------------------------ */

/* Move what OpenSSL wrote for the device onto its socket (or keep it): 0 all went, 1 some is
 * kept (the socket is full), -1 a failure (errno). */
static int
send_device_records(Conn *c)
{
    return flush_records(c->dwbio, c->device.fd, &c->to_device, &c->device_writable);
}

/* Plaintext for the device: encrypted, then sent (or kept). As send_device_records. */
static int
send_to_device(Core *core, Conn *c, const char *data, size_t size)
{
    if (c->dssl == NULL) {
        return send_or_keep(c->device.fd, data, size, &c->to_device, &c->device_writable);
    }
    for (size_t done = 0; done < size;) {
        size_t written = 0;
        if (ossl.ssl_write_ex(c->dssl, data + done, size - done, &written) != 1) {
            ossl.err_clear_error();
            errno = EPROTO; /* (the device's TLS connection failed before) */
            return -1;
        }
        done += written;
    }
    return send_device_records(c);
}

#define DEVICE_TLS_FAILED (-3) /* the connection was ended (its reason named) */

/* What the device sent, as plaintext in *data: > 0 its size, 0 the device's end (close_notify,
 * or a FIN), -1 nothing more for now, -2 a socket failure (errno), DEVICE_TLS_FAILED. */
static ssize_t
read_device(Core *core, Conn *c, const char **data)
{
    if (c->dssl == NULL) {
        *data = incoming;
        return c->device_readable ? receive(c->device.fd, &c->device_readable, c->device_hup)
                                  : -1;
    }
    if (c->device_failure != NULL) { /* what came before it has gone on */
        end(core, c, "device_lost", 0, c->device_failure, c->device_failure);
        return DEVICE_TLS_FAILED;
    }
    if (c->device_clean_eof) {
        return 0;
    }
    for (;;) {
        /* Decrypt what OpenSSL has, as much as fits (records of up to 16 KiB each). */
        size_t filled = 0;
        int error = 0;
        while (filled + RECORD_MAX <= CHUNK) {
            size_t got = 0;
            ossl.err_clear_error();
            if (ossl.ssl_read_ex(c->dssl, plain + filled, CHUNK - filled, &got) == 1) {
                filled += got;
                continue;
            }
            error = ossl.ssl_get_error(c->dssl, 0);
            break;
        }
        if (error != 0 && error != SSL_ERROR_WANT_READ && error != SSL_ERROR_ZERO_RETURN) {
            char reason[96];
            long verify_code;
            name_failure_of(c->dssl, reason, sizeof reason, &verify_code);
            c->alerted = 1;
            send_device_records(c); /* the alert, so the device knows why */
            if (filled == 0) {
                end(core, c, "device_lost", 0, reason, reason[0] ? reason : "TLS error");
                return DEVICE_TLS_FAILED;
            }
            c->device_failure = strdup(reason[0] ? reason : "TLS error"); /* at the next read */
            if (c->device_failure == NULL) {
                errno = ENOMEM;
                return -2;
            }
        }
        else if (send_device_records(c) < 0) { /* what reading made OpenSSL write (key updates) */
            return -2;
        }
        if (error == SSL_ERROR_ZERO_RETURN) {
            c->device_clean_eof = 1; /* (after the data decrypted before it) */
        }
        if (filled > 0) {
            *data = plain;
            return (ssize_t)filled;
        }
        if (error == SSL_ERROR_ZERO_RETURN) {
            return 0;
        }
        if (!c->device_readable) {
            return -1;
        }
        ssize_t raw = receive(c->device.fd, &c->device_readable, c->device_hup);
        if (raw <= 0) {
            return raw; /* (a FIN without close_notify: see move_up) */
        }
        if (ossl.bio_write(c->drbio, incoming, (int)raw) != (int)raw) {
            ossl.err_clear_error();
            errno = ENOMEM;
            return -2;
        }
    }
}

/* The destination's end passed on to the device: close_notify first if it speaks TLS. 0: done
 * (its socket shut for writing), 1: waiting for the socket to take what was kept, -1: errno. */
static int
shut_device(Conn *c)
{
    if (c->dssl != NULL && !c->device_notify_sent) {
        c->device_notify_sent = 1;
        if (!c->upstream_cut) {
            ossl.ssl_shutdown(c->dssl);
            ossl.err_clear_error();
        }
    }
    int left = c->dssl != NULL ? send_device_records(c) : 0;
    if (left != 0) {
        return left;
    }
    c->device_shut = 1;
    shutdown(c->device.fd, SHUT_WR);
    return 0;
}

/* Whether reading the device may give something: its socket has more, or (TLS) records wait in
 * the BIO, or an end or a failure found with the last data is still to be acted on. */
static int
device_has_more(Conn *c)
{
    if (c->device_readable) {
        return 1;
    }
    return c->dssl != NULL && (ossl.bio_ctrl_pending(c->drbio) > 0 || c->device_clean_eof ||
                               c->device_failure != NULL);
}

/* Device -> destination: read plaintext, encrypt, send. 0: go on, -1: the connection ended. */
static int
move_up(Core *core, Conn *c)
{
    if (c->to_upstream.data != NULL) {
        if (resend(c->upstream.fd, &c->to_upstream, &c->upstream_writable) < 0) {
            lost(core, c, SIDE_UPSTREAM, errno);
            return -1;
        }
        send_records(c); /* records OpenSSL wrote meanwhile (close_notify, key updates) */
        if (upstream_failed) {
            lost(core, c, SIDE_UPSTREAM, upstream_failed);
            return -1;
        }
        if (c->to_upstream.data != NULL) {
            return 0;
        }
    }
    for (int chunks = 0; !c->device_eof && device_has_more(c) && c->to_upstream.data == NULL;
         chunks++) {
        if (chunks == core->turn_chunks) {
            post(core, c);
            break;
        }
        const char *data;
        ssize_t got = read_device(core, c, &data);
        if (got == -1) {
            break;
        }
        if (got == DEVICE_TLS_FAILED) {
            return -1;
        }
        if (got == -2) {
            lost(core, c, SIDE_DEVICE, errno);
            return -1;
        }
        if (got == 0) {
            c->device_eof = 1; /* a half-close: passed on as close_notify */
            c->close_notify_sent = 1;
            if (c->dssl != NULL && !c->device_clean_eof) {
                break; /* a TLS device's FIN without its close_notify: a cut, passed on as one */
            }
            ossl.ssl_shutdown(c->ssl);
            ossl.err_clear_error();
            send_records(c);
            if (upstream_failed) {
                lost(core, c, SIDE_UPSTREAM, upstream_failed);
                return -1;
            }
            break;
        }
        c->up_bytes += (unsigned long long)got;
        touch(core, c);
        size_t done = 0;
        while (done < (size_t)got) {
            size_t written = 0;
            if (ossl.ssl_write_ex(c->ssl, data + done, (size_t)got - done, &written) != 1) {
                ossl.err_clear_error();
                end(core, c, "destination_lost", 0, "", "OpenSSL would not encrypt");
                return -1;
            }
            done += written;
        }
        send_records(c);
        if (upstream_failed) {
            lost(core, c, SIDE_UPSTREAM, upstream_failed);
            return -1;
        }
    }
    if (c->device_eof && !c->upstream_shut && c->to_upstream.data == NULL) {
        c->upstream_shut = 1;
        shutdown(c->upstream.fd, SHUT_WR);
    }
    return 0;
}

/* Destination -> device: decrypt what was read, send it; read more when all of it went. */
static int
move_down(Core *core, Conn *c)
{
    int left = resend(c->device.fd, &c->to_device, &c->device_writable);
    if (left == 0 && c->dssl != NULL) {
        left = send_device_records(c); /* the records behind what was kept */
    }
    if (left < 0) {
        lost(core, c, SIDE_DEVICE, errno);
        return -1;
    }
    if (left > 0) {
        return 0;
    }
    int chunks = 0;
    while (!c->upstream_eof && c->to_device.data == NULL) {
        /* Decrypt what is already in OpenSSL's hands, as much as fits. */
        size_t filled = 0;
        int error = 0;
        while (filled + RECORD_MAX <= CHUNK) {
            size_t got = 0;
            ossl.err_clear_error();
            int ok = ossl.ssl_read_ex(c->ssl, plain + filled, CHUNK - filled, &got);
            if (ok == 1) {
                filled += got;
                continue;
            }
            error = ossl.ssl_get_error(c->ssl, 0);
            break;
        }
        if (!c->session_done) {
            take_session(core, c);
        }
        send_records(c); /* what reading made OpenSSL write (a key update's answer) */
        if (upstream_failed) {
            lost(core, c, SIDE_UPSTREAM, upstream_failed);
            return -1;
        }
        if (filled > 0) {
            c->down_bytes += filled;
            touch(core, c);
            c->session_done = 1; /* data flowed: a ticket that did not come with it never will */
            int sent = send_to_device(core, c, plain, filled);
            if (sent < 0) {
                lost(core, c, SIDE_DEVICE, errno);
                return -1;
            }
            if (sent > 0) {
                return 0;
            }
            if (error == 0) {
                continue; /* the scratch filled up: more may be decrypted */
            }
        }
        if (c->on_read != NULL && c->fresh_records) {
            /* (after the plaintext went: the hook may let another thread run, and `plain` is
             * shared) */
            c->fresh_records = 0;
            after_read(core, c);
        }
        if (error == SSL_ERROR_ZERO_RETURN) {
            c->upstream_eof = 1; /* close_notify: passed on as a half-close */
            break;
        }
        if (error != SSL_ERROR_WANT_READ && error != 0) {
            char reason[96];
            long verify_code;
            name_the_failure(c, reason, sizeof reason, &verify_code);
            end(core, c, "destination_lost", 0, reason, reason[0] ? reason : "TLS error");
            return -1;
        }
        if (!c->upstream_readable) {
            break;
        }
        if (chunks++ == core->turn_chunks) {
            post(core, c);
            break;
        }
        ssize_t got = receive(c->upstream.fd, &c->upstream_readable, c->upstream_hup);
        if (got == -1) {
            break;
        }
        if (got == -2) {
            lost(core, c, SIDE_UPSTREAM, errno);
            return -1;
        }
        if (got == 0) {
            c->upstream_eof = 1; /* closed without close_notify: the end of this direction */
            c->upstream_cut = 1; /* (a TLS device is not told it was complete) */
            break;
        }
        if (ossl.bio_write(c->rbio, incoming, (int)got) != (int)got) {
            ossl.err_clear_error();
            end(core, c, "destination_lost", 0, "", "out of memory for records");
            return -1;
        }
        c->read_since_handshake = 1;
        c->fresh_records = 1;
    }
    if (c->upstream_eof && !c->device_shut && c->to_device.data == NULL &&
        shut_device(c) < 0) {
        lost(core, c, SIDE_DEVICE, errno);
        return -1;
    }
    return 0;
}

static void
relay(Core *core, Conn *c)
{
    if (move_up(core, c) < 0 || move_down(core, c) < 0) {
        return;
    }
    if (c->upstream_shut && c->device_shut) {
        end(core, c, "closed", 0, "", "");
    }
}

/* Give each posted connection its next turn (it may post itself again). */
static void
run_posted(Core *core)
{
    Conn *list = core->posted;
    core->posted = NULL;
    while (list != NULL) {
        Conn *c = list;
        list = c->posted_next;
        c->posted = 0;
        c->posted_next = NULL;
        if (c->state == RELAYING) {
            relay(core, c);
        }
    }
}

/* -- accepting ---------------------------------------------------------------------------------- */

static int
watch(Core *core, Handle *handle, uint32_t events)
{
    struct epoll_event event = {.events = events, .data.ptr = handle};
    return epoll_ctl(core->epfd, EPOLL_CTL_ADD, handle->fd, &event);
}

static void
source_of(const struct sockaddr_storage *peer, char *out)
{
    out[0] = '?';
    out[1] = '\0';
    if (peer->ss_family == AF_INET) {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)peer)->sin_addr, out, INET6_ADDRSTRLEN);
    }
    else if (peer->ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)peer)->sin6_addr, out,
                  INET6_ADDRSTRLEN);
    }
}

#define EDGE (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)

/* Connect to the destination's address number c->attempt, or the next ones if that fails at
 * once; EPOLLOUT on the socket says when it is connected (or failed: connected() moves on). */
static void
dial(Core *core, Conn *c)
{
    int one = 1;
    for (; c->attempt < core->address_count; c->attempt++) {
        const struct sockaddr_storage *address = &core->addresses[c->attempt];
        int up = socket(address->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (up < 0) {
            if (c->attempt + 1 == core->address_count) {
                end(core, c, "connect_failed", 0, "", strerror(errno));
                return;
            }
            continue; /* (no IPv6 here, say): the next address */
        }
        c->upstream.fd = up;
        c->upstream_readable = c->upstream_writable = c->upstream_hup = 0;
        setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (watch(core, &c->upstream, EDGE) < 0) {
            end(core, c, "connect_failed", 0, "", strerror(errno));
            return;
        }
        if (connect(up, (const struct sockaddr *)address, core->address_sizes[c->attempt]) == 0 ||
            errno == EINPROGRESS) {
            return;
        }
        int failure = errno;
        close(up);
        c->upstream.fd = -1;
        if (c->attempt + 1 == core->address_count) {
            end(core, c, "connect_failed", 0, "", strerror(failure));
            return;
        }
    }
    end(core, c, "connect_failed", 0, "", "the destination's name has no address (yet)");
}

static void
accept_one(Core *core, int fd, const struct sockaddr_storage *peer)
{
    Conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        close(fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->device = (Handle){c, SIDE_DEVICE, fd};
    c->upstream = (Handle){c, SIDE_UPSTREAM, -1};
    c->state = CONNECTING;
    c->started = c->last = now(core);
    c->idle_timeout = core->idle_timeout;
    enqueue(core, c, QUEUE_SETUP);
    source_of(peer, c->source);
    c->next = core->live;
    if (core->live != NULL) {
        core->live->prev = c;
    }
    core->live = c;
    core->count++;
    if (core->count > core->held_peak) {
        core->held_peak = core->count;
    }
    core->accepted++;

    if (watch(core, &c->device, EDGE) < 0) {
        end(core, c, "connect_failed", 0, "", strerror(errno));
        return;
    }
    dial(core, c);
}

static void
accept_all(Core *core, Handle *listener)
{
    for (int i = 0; i < ACCEPTS_PER_EVENT; i++) {
        struct sockaddr_storage peer;
        socklen_t size = sizeof peer;
        int fd = accept4(listener->fd, (struct sockaddr *)&peer, &size,
                         SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            accept_one(core, fd, &peer);
            continue;
        }
        if (errno == EINTR || errno == ECONNABORTED) {
            continue;
        }
        int failure = errno;
        if (failure == EMFILE || failure == ENFILE || failure == ENOBUFS || failure == ENOMEM) {
            /* Out of descriptors: stop accepting until the next expire(), rather than spin. */
            for (int j = 0; j < core->listener_count; j++) {
                epoll_ctl(core->epfd, EPOLL_CTL_DEL, core->listeners[j]->fd, NULL);
            }
            core->listeners_paused = 1;
            core->calling++;
            PyObject *result = PyObject_CallFunction(core->on_end, "sslssKK", "accept_failed", "",
                                                     0L, "", strerror(failure), 0ULL, 0ULL);
            if (result == NULL) {
                PyErr_WriteUnraisable(core->on_end);
            }
            Py_XDECREF(result);
            core->calling--;
        }
        return; /* EAGAIN: all taken */
    }
}

/* -- events ------------------------------------------------------------------------------------- */

static void
handle_event(Core *core, Handle *handle, uint32_t events)
{
    if (handle->side == SIDE_LISTENER) {
        accept_all(core, handle);
        return;
    }
    Conn *c = handle->conn;
    if (c->state == ENDED) {
        return;
    }
    int hangup = (events & (EPOLLERR | EPOLLHUP)) != 0;
    int ending = (events & (EPOLLRDHUP | EPOLLERR | EPOLLHUP)) != 0;
    if (handle->side == SIDE_DEVICE) {
        if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) {
            c->device_readable = 1;
        }
        if (ending) {
            c->device_hup = 1;
        }
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            c->device_writable = 1;
        }
    }
    else {
        if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) {
            c->upstream_readable = 1;
        }
        if (ending) {
            c->upstream_hup = 1;
        }
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            c->upstream_writable = 1;
        }
    }
    switch (c->state) {
    case CONNECTING:
        if (handle->side == SIDE_UPSTREAM) {
            connected(core, c);
        }
        break;
    case HANDSHAKE:
        if (handle->side == SIDE_UPSTREAM) {
            step_handshake(core, c);
        }
        else if (hangup) {
            end(core, c, "device_lost", 0, "", "the device left during the handshake");
        }
        break;
    case RELAYING:
        relay(core, c);
        break;
    }
}

/* -- the Python type ---------------------------------------------------------------------------- */

/* A Core is used only once initialised, and not from inside its own callback. */
static int
usable(Core *self)
{
    if (self->on_end == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Core was not initialised");
        return 0;
    }
    if (self->calling) {
        PyErr_SetString(PyExc_RuntimeError, "the Core was called from its own callback");
        return 0;
    }
    return 1;
}

static int
core_init(Core *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"context", "ctx", "server_name", "name_is_ip", "identity",
                               "resume", "connect_timeout", "idle_timeout", "on_end", "clock",
                               "turn_chunks", NULL};
    PyObject *context, *identity, *on_end, *clock = Py_None;
    int turn_chunks = TURN_CHUNKS;
    unsigned long long ctx;
    const char *server_name;
    int name_is_ip, resume;
    double connect_timeout, idle_timeout;
    if (self->on_end != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Core is initialised once");
        return -1;
    }
    if (!ossl.bound) {
        PyErr_SetString(PyExc_RuntimeError, "bind() OpenSSL's entry points first");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OKzpOpddO|Oi", keywords, &context, &ctx,
                                     &server_name, &name_is_ip, &identity, &resume,
                                     &connect_timeout, &idle_timeout, &on_end, &clock,
                                     &turn_chunks)) {
        return -1;
    }
    if (turn_chunks < 1) {
        PyErr_SetString(PyExc_ValueError, "turn_chunks must be at least 1");
        return -1;
    }
    if (!PyCallable_Check(on_end)) {
        PyErr_SetString(PyExc_ValueError, "a callable on_end is needed");
        return -1;
    }
    /* (no SSL_CTX: a core for adopted connections only, which listen() refuses) */
    unsigned long long cert = 0, key = 0, chain = 0;
    if (identity != Py_None) {
        PyObject *pointers = PyObject_CallMethod(identity, "pointers", NULL);
        if (pointers == NULL) {
            return -1;
        }
        int ok = PyArg_ParseTuple(pointers, "KKK", &cert, &key, &chain);
        Py_DECREF(pointers);
        if (!ok) {
            return -1;
        }
    }
    char *name = NULL;
    if (server_name != NULL && (name = strdup(server_name)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        free(name);
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->epfd = epfd;
    self->server_name = name;
    self->cert = (void *)(uintptr_t)cert;
    self->key = (void *)(uintptr_t)key;
    self->chain = (void *)(uintptr_t)chain;
    self->context = Py_NewRef(context);
    self->ctx = (void *)(uintptr_t)ctx;
    self->identity = Py_NewRef(identity);
    self->name_is_ip = name_is_ip;
    self->resume = resume;
    self->session_at = -1e18;
    self->trimmed_at = -1e18;
    self->connect_timeout = connect_timeout;
    self->turn_chunks = turn_chunks;
    self->idle_timeout = idle_timeout;
    self->on_end = Py_NewRef(on_end);
    self->clock = clock == Py_None ? NULL : Py_NewRef(clock);
    return 0;
}

/* set_destination(ips, port): where the next connections go, tried in that order. */
static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Core *self = (Core *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->epfd = -1;
    }
    return (PyObject *)self;
}

static PyObject *
core_set_destination(Core *self, PyObject *args)
{
    PyObject *ips;
    int port;
    if (!PyArg_ParseTuple(args, "Oi", &ips, &port) || !usable(self)) {
        return NULL;
    }
    if (port <= 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return NULL;
    }
    PyObject *items = PySequence_Fast(ips, "ips must be a sequence of IP addresses");
    if (items == NULL) {
        return NULL;
    }
    Py_ssize_t size = PySequence_Fast_GET_SIZE(items);
    if (size > MAX_ADDRESSES) {
        size = MAX_ADDRESSES;
    }
    struct sockaddr_storage addresses[MAX_ADDRESSES];
    socklen_t sizes[MAX_ADDRESSES];
    memset(addresses, 0, sizeof addresses);
    for (Py_ssize_t i = 0; i < size; i++) {
        const char *host = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(items, i));
        if (host == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        struct sockaddr_in *v4 = (struct sockaddr_in *)&addresses[i];
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&addresses[i];
        if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
            v4->sin_family = AF_INET;
            v4->sin_port = htons((uint16_t)port);
            sizes[i] = sizeof *v4;
        }
        else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
            v6->sin6_family = AF_INET6;
            v6->sin6_port = htons((uint16_t)port);
            sizes[i] = sizeof *v6;
        }
        else {
            Py_DECREF(items);
            PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
            return NULL;
        }
    }
    Py_DECREF(items);
    memcpy(self->addresses, addresses, sizeof addresses);
    memcpy(self->address_sizes, sizes, sizeof sizes);
    self->address_count = (int)size;
    Py_RETURN_NONE;
}

static PyObject *
core_listen(Core *self, PyObject *arg)
{
    if (!usable(self)) {
        return NULL;
    }
    if (self->ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "a core without a destination only adopts connections");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(arg);
    if (fd < 0) {
        return NULL;
    }
    if (self->listener_count == (int)(sizeof self->listeners / sizeof self->listeners[0])) {
        PyErr_SetString(PyExc_ValueError, "too many listeners for one core");
        return NULL;
    }
    Handle *handle = malloc(sizeof *handle);
    if (handle == NULL) {
        return PyErr_NoMemory();
    }
    *handle = (Handle){NULL, SIDE_LISTENER, fd};
    if (watch(self, handle, EPOLLIN) < 0) {
        free(handle);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->listeners[self->listener_count++] = handle;
    Py_RETURN_NONE;
}

/* adopt(device_fd, upstream_fd, owner, ssl, source, idle_timeout, on_end, on_read, device_ssl=0)
 * -> key: relay a connection Python set up (the device's socket, plain, or with its TLS handshake
 * done on `device_ssl`, the server side; the destination's, with its TLS handshake done on
 * `ssl`; both SSLs with memory BIOs, which `owner` keeps alive). The sockets are
 * the core's from now on (it closes them); on an exception they are still the caller's. What
 * the SSL's BIOs hold is taken up as if it had just been read or written. */
static PyObject *
core_adopt(Core *self, PyObject *args)
{
    int device_fd, upstream_fd;
    PyObject *owner, *on_end, *on_read;
    unsigned long long ssl, device_ssl = 0;
    const char *source;
    double idle_timeout;
    if (!PyArg_ParseTuple(args, "iiOKsdOO|K", &device_fd, &upstream_fd, &owner, &ssl, &source,
                          &idle_timeout, &on_end, &on_read, &device_ssl) ||
        !usable(self)) {
        return NULL;
    }
    void *drbio = NULL, *dwbio = NULL;
    if (device_ssl != 0) {
        drbio = ossl.ssl_get_rbio((void *)(uintptr_t)device_ssl);
        dwbio = ossl.ssl_get_wbio((void *)(uintptr_t)device_ssl);
        if (drbio == NULL || dwbio == NULL) {
            PyErr_SetString(PyExc_ValueError, "the device's SSL has no memory BIOs");
            return NULL;
        }
    }
    if (ssl == 0 || !PyCallable_Check(on_end) || (on_read != Py_None && !PyCallable_Check(on_read))) {
        PyErr_SetString(PyExc_ValueError, "an SSL, a callable on_end and on_read (or None)");
        return NULL;
    }
    void *rbio = ossl.ssl_get_rbio((void *)(uintptr_t)ssl);
    void *wbio = ossl.ssl_get_wbio((void *)(uintptr_t)ssl);
    if (rbio == NULL || wbio == NULL) {
        PyErr_SetString(PyExc_ValueError, "the SSL has no memory BIOs");
        return NULL;
    }
    Conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        return PyErr_NoMemory();
    }
    c->device = (Handle){c, SIDE_DEVICE, device_fd};
    c->upstream = (Handle){c, SIDE_UPSTREAM, upstream_fd};
    c->ssl = (void *)(uintptr_t)ssl;
    c->rbio = rbio;
    c->wbio = wbio;
    c->dssl = (void *)(uintptr_t)device_ssl;
    c->drbio = drbio;
    c->dwbio = dwbio;
    c->adopted = 1;
    c->state = RELAYING;
    c->started = now(self);
    c->idle_timeout = idle_timeout;
    c->session_done = 1;         /* its sessions are Python's business (on_read) */
    c->read_since_handshake = 1; /* records already in the BIO may carry the ticket */
    c->fresh_records = 1;
    strncpy(c->source, source, sizeof c->source - 1);
    if (watch(self, &c->device, EDGE) < 0) {
        free(c);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (watch(self, &c->upstream, EDGE) < 0) {
        int failure = errno;
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, device_fd, NULL);
        free(c);
        errno = failure;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    ossl.ssl_ctrl(c->ssl, SSL_CTRL_MODE,
                  SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
    if (c->dssl != NULL) {
        ossl.ssl_ctrl(c->dssl, SSL_CTRL_MODE,
                      SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
    }
    c->owner = Py_NewRef(owner);
    c->on_end = Py_NewRef(on_end);
    c->on_read = on_read == Py_None ? NULL : Py_NewRef(on_read);
    c->key = take_slot(self, c);
    if (c->key == 0) {
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, device_fd, NULL);
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, upstream_fd, NULL);
        c->adopted = 0; /* (nothing of the caller's is freed with it) */
        c->ssl = c->dssl = NULL;
        free_conn(c);
        return PyErr_NoMemory();
    }
    touch(self, c);
    c->next = self->live;
    if (self->live != NULL) {
        self->live->prev = c;
    }
    self->live = c;
    self->count++;
    if (self->count > self->held_peak) {
        self->held_peak = self->count;
    }
    /* Both sockets are writable: their first events come at once and start the relay. */
    return PyLong_FromUnsignedLongLong(c->key);
}

/* cut(key, outcome) -> whether that adopted connection was still live (it is ended now). */
static PyObject *
core_cut(Core *self, PyObject *args)
{
    unsigned long long key;
    const char *outcome;
    if (!PyArg_ParseTuple(args, "Ks", &key, &outcome) || !usable(self)) {
        return NULL;
    }
    unsigned slot = (unsigned)(key & 0xffffffffu);
    Conn *c = slot < self->slot_count ? self->slots[slot] : NULL;
    if (c == NULL || c->key != key) {
        Py_RETURN_FALSE;
    }
    end(self, c, outcome, 0, "", "");
    free_ended(self);
    Py_RETURN_TRUE;
}

static PyObject *
core_fileno(Core *self, PyObject *unused)
{
    if (self->on_end == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Core was not initialised");
        return NULL;
    }
    return PyLong_FromLong(self->epfd);
}

/* What the loop calls when the epoll descriptor is readable. */
static PyObject *
core_run(Core *self, PyObject *unused)
{
    if (!usable(self)) {
        return NULL;
    }
    struct epoll_event events[BATCH];
    int ready = epoll_wait(self->epfd, events, BATCH, 0);
    for (int i = 0; i < ready; i++) {
        handle_event(self, events[i].data.ptr, events[i].events);
    }
    run_posted(self);
    free_ended(self);
    return PyBool_FromLong(self->posted != NULL);
}

/* The core as the thread's only loop: wait for events (the GIL released while waiting) and
 * handle them, for up to ``seconds``. Back early when a signal interrupted the wait, once its
 * Python handler ran (an exception it raised propagates). One system call per wake-up where an
 * event loop watching the epoll descriptor costs two, and no loop machinery in between. */
static PyObject *
core_serve(Core *self, PyObject *arg)
{
    double seconds = PyFloat_AsDouble(arg);
    if ((seconds == -1.0 && PyErr_Occurred()) || !usable(self)) {
        return NULL;
    }
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double deadline = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + seconds;
    struct epoll_event events[BATCH];
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        double left = deadline - ((double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
        if (left <= 0) {
            break;
        }
        int ready;
        int wait_ms = self->posted != NULL ? 0 : (int)(left * 1000.0) + 1;
        Py_BEGIN_ALLOW_THREADS
        ready = epoll_wait(self->epfd, events, BATCH, wait_ms);
        Py_END_ALLOW_THREADS
        if (ready < 0) {
            if (errno != EINTR) {
                return PyErr_SetFromErrno(PyExc_OSError);
            }
            if (PyErr_CheckSignals() < 0) {
                return NULL;
            }
            break;
        }
        for (int i = 0; i < ready; i++) {
            handle_event(self, events[i].data.ptr, events[i].events);
        }
        run_posted(self);
        free_ended(self);
    }
    Py_RETURN_NONE;
}

/* Twice a second: connections that took too long to set up, went quiet, or moved nothing for
 * too long. Each queue is in the order its connections come due, so only those that have come
 * due are looked at (an idle gateway holds tens of thousands that have not). */
static PyObject *
core_expire(Core *self, PyObject *unused)
{
    if (!usable(self)) {
        return NULL;
    }
    double moment = now(self);
    Conn *c;
    while ((c = self->queues[QUEUE_SETUP].head) != NULL &&
           moment - c->started >= self->connect_timeout) {
        end(self, c, "connect_timeout", 0, "", "");
    }
    while ((c = self->queues[QUEUE_ACTIVE].head) != NULL && moment - c->last >= REST_AFTER_S) {
        if (moment - c->last >= c->idle_timeout) {
            end(self, c, "idle_timeout", 0, "", "");
            continue;
        }
        /* Quiet for a while: OpenSSL's record buffers (about 34 KiB) go back until the next
         * record (kept while busy: freeing them after every record costs CPU). */
        if (free_buffers_allowed) {
            c->resting = ossl.ssl_free_buffers(c->ssl) == 1; /* (0: a record half read) */
            if (c->dssl != NULL) {
                ossl.ssl_free_buffers(c->dssl);
            }
        }
        enqueue(self, c, resting_queue(self, c->idle_timeout));
    }
    for (int k = 0; k < self->resting_kinds; k++) { /* each: oldest first, until one is not due */
        while ((c = self->queues[QUEUE_RESTING + k].head) != NULL &&
               moment - c->last >= self->resting_timeout[k]) {
            end(self, c, "idle_timeout", 0, "", "");
        }
    }
    for (c = self->queues[QUEUE_MIXED].head; c != NULL;) {
        Conn *next = c->due_next;
        if (moment - c->last >= c->idle_timeout) {
            end(self, c, "idle_timeout", 0, "", "");
        }
        c = next;
    }
    free_ended(self);
    trim_after_burst(self, moment);
    if (self->listeners_paused) {
        self->listeners_paused = 0;
        for (int j = 0; j < self->listener_count; j++) {
            watch(self, self->listeners[j], EPOLLIN);
        }
    }
    Py_RETURN_NONE;
}

/* End every connection (the relay stops). */
static PyObject *
core_close_all(Core *self, PyObject *arg)
{
    if (!usable(self)) {
        return NULL;
    }
    const char *outcome = PyUnicode_AsUTF8(arg);
    if (outcome == NULL) {
        return NULL;
    }
    while (self->live != NULL) {
        end(self, self->live, outcome, 0, "", "");
    }
    free_ended(self);
    Py_RETURN_NONE;
}

/* (a walk of the resting queue: for tests and occasional reports, not for every event) */
static PyObject *
core_get_resting(Core *self, void *closure)
{
    Py_ssize_t resting = 0;
    for (int q = QUEUE_RESTING; q < QUEUES; q++) {
        for (Conn *c = self->queues[q].head; c != NULL; c = c->due_next) {
            resting += c->resting;
        }
    }
    return PyLong_FromSsize_t(resting);
}

static PyObject *
core_get_trims(Core *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->trims);
}

static PyObject *
core_get_trim_due(Core *self, void *closure)
{
    return PyBool_FromLong(trim_due(self));
}

static PyObject *
core_get_adopted(Core *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->adopted);
}

static PyObject *
core_get_count(Core *self, void *closure)
{
    return PyLong_FromSsize_t(self->count);
}

static PyObject *
core_get_accepted(Core *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->accepted);
}

static PyObject *
core_get_turns_posted(Core *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->turns_posted);
}

/* Every connection closed and freed, with no report (the core is going away). */
static void
drop_all(Core *self)
{
    while (self->live != NULL) {
        Conn *c = self->live;
        self->live = c->next;
        release_slot(self, c);
        forget_socket(self, &c->device.fd);
        forget_socket(self, &c->upstream.fd);
        free_conn(c);
    }
    self->count = 0;
    self->posted = NULL;
    memset(self->queues, 0, sizeof self->queues);
    memset(self->queue_length, 0, sizeof self->queue_length);
    self->busy_peak = 0;
    self->held_peak = 0;
}

static int
core_traverse(Core *self, visitproc visit, void *arg)
{
    Py_VISIT(self->context);
    Py_VISIT(self->identity);
    Py_VISIT(self->on_end);
    Py_VISIT(self->clock);
    Conn *lists[] = {self->live, self->ended};
    for (int i = 0; i < 2; i++) {
        for (Conn *c = lists[i]; c != NULL; c = c->next) {
            Py_VISIT(c->owner);
            Py_VISIT(c->on_end);
            Py_VISIT(c->on_read);
        }
    }
    return 0;
}

/* Breaking a cycle (the Tunnel holds the Core, the Core its bound method; an adopted
 * connection's callbacks hold what holds the Core): the connections are dropped (their sockets
 * closed), and no callback is made any more (usable() refuses). */
static int
core_clear(Core *self)
{
    Py_CLEAR(self->on_end);
    Py_CLEAR(self->clock);
    drop_all(self);
    return 0;
}

static void
core_dealloc(Core *self)
{
    PyObject_GC_UnTrack(self);
    drop_all(self);
    free_ended(self);
    for (int j = 0; j < self->listener_count; j++) {
        free(self->listeners[j]);
    }
    if (self->session != NULL) {
        ossl.session_free(self->session);
    }
    free(self->slots);
    free(self->free_slots);
    if (self->epfd >= 0) {
        close(self->epfd);
    }
    free(self->server_name);
    Py_XDECREF(self->context);
    Py_XDECREF(self->identity);
    core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef core_methods[] = {
    {"set_destination", (PyCFunction)core_set_destination, METH_VARARGS,
     "set_destination(ips, port): where the next connections go (tried in that order)"},
    {"listen", (PyCFunction)core_listen, METH_O,
     "listen(sock): accept connections from a listening socket (kept open by the caller)"},
    {"fileno", (PyCFunction)core_fileno, METH_NOARGS, "the epoll descriptor to watch"},
    {"run", (PyCFunction)core_run, METH_NOARGS, "handle the events that are ready"},
    {"serve", (PyCFunction)core_serve, METH_O,
     "serve(seconds): wait for events and handle them, for up to that long (or a signal)"},
    {"expire", (PyCFunction)core_expire, METH_NOARGS, "end connections past their timeouts"},
    {"close_all", (PyCFunction)core_close_all, METH_O, "close_all(outcome): end every connection"},
    {"adopt", (PyCFunction)core_adopt, METH_VARARGS,
     "adopt(device_fd, upstream_fd, owner, ssl, source, idle_timeout, on_end, on_read, "
     "device_ssl=0) -> key"},
    {"cut", (PyCFunction)core_cut, METH_VARARGS,
     "cut(key, outcome) -> whether the adopted connection was live (it is ended)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"count", (getter)core_get_count, NULL, "connections not ended", NULL},
    {"accepted", (getter)core_get_accepted, NULL, "connections accepted in all", NULL},
    {"adopted", (getter)core_get_adopted, NULL, "connections adopted in all", NULL},
    {"trims", (getter)core_get_trims, NULL,
     "times the memory of a burst of connections went back to the system", NULL},
    {"trim_due", (getter)core_get_trim_due, NULL,
     "whether expire() has memory to give back (at most every 10 s), connections or not", NULL},
    {"resting", (getter)core_get_resting, NULL,
     "connections quiet long enough to have given their record buffers back", NULL},
    {"turns_posted", (getter)core_get_turns_posted, NULL,
     "times a direction used up its turn with more to read", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fleetgate.dataplane._tunnel.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_doc = "Accepted connections relayed to one TLS destination, set up and relayed in C",
    .tp_new = core_new,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
};

/* allow_freeing_buffers(flag): whether quiet connections' record buffers are given back. */
static PyObject *
tunnel_allow_freeing_buffers(PyObject *module, PyObject *flag)
{
    int allowed = PyObject_IsTrue(flag);
    if (allowed < 0) {
        return NULL;
    }
    free_buffers_allowed = allowed;
    Py_RETURN_NONE;
}

/* bind(*addresses): OpenSSL's entry points, in the order of native.TUNNEL_ENTRY_POINTS. */
static PyObject *
tunnel_bind(PyObject *module, PyObject *args)
{
    void **slots[] = {
        (void **)&ossl.ssl_new, (void **)&ossl.ssl_free, (void **)&ossl.ssl_set_bio,
        (void **)&ossl.bio_new, (void **)&ossl.bio_s_mem, (void **)&ossl.ssl_set_connect_state,
        (void **)&ossl.ssl_do_handshake, (void **)&ossl.ssl_read_ex, (void **)&ossl.ssl_write_ex,
        (void **)&ossl.ssl_get_error, (void **)&ossl.bio_write, (void **)&ossl.bio_read,
        (void **)&ossl.bio_ctrl_pending, (void **)&ossl.ssl_shutdown, (void **)&ossl.ssl_ctrl,
        (void **)&ossl.ssl_set1_host, (void **)&ossl.ssl_get0_param,
        (void **)&ossl.param_set1_ip_asc, (void **)&ossl.ssl_set_session,
        (void **)&ossl.ssl_get1_session, (void **)&ossl.session_is_resumable,
        (void **)&ossl.session_free, (void **)&ossl.ssl_get_verify_result,
        (void **)&ossl.ssl_use_cert_and_key, (void **)&ossl.ssl_get_shutdown,
        (void **)&ossl.ssl_set_shutdown, (void **)&ossl.err_peek_last_error,
        (void **)&ossl.err_clear_error, (void **)&ossl.err_reason_error_string,
        (void **)&ossl.ssl_session_reused, (void **)&ossl.ssl_free_buffers,
        (void **)&ossl.bio_free, (void **)&ossl.ssl_get_rbio, (void **)&ossl.ssl_get_wbio,
    };
    Py_ssize_t wanted = (Py_ssize_t)(sizeof slots / sizeof slots[0]);
    if (PyTuple_GET_SIZE(args) != wanted) {
        PyErr_Format(PyExc_TypeError, "bind() takes %zd addresses", wanted);
        return NULL;
    }
    void *found[sizeof slots / sizeof slots[0]];
    for (Py_ssize_t i = 0; i < wanted; i++) {
        found[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args, i));
        if (found[i] == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "an entry point is NULL");
            }
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < wanted; i++) {
        *slots[i] = found[i];
    }
    ossl.bound = 1;
    Py_RETURN_NONE;
}

static PyMethodDef tunnel_functions[] = {
    {"bind", tunnel_bind, METH_VARARGS, "bind(*addresses): OpenSSL's entry points"},
    {"allow_freeing_buffers", tunnel_allow_freeing_buffers, METH_O,
     "allow_freeing_buffers(flag): whether quiet connections give their record buffers back"},
    {NULL, NULL, 0, NULL},
};

static int
tunnel_exec(PyObject *module)
{
    if (PyType_Ready(&CoreType) < 0) {
        return -1;
    }
    return PyModule_AddObjectRef(module, "Core", (PyObject *)&CoreType);
}

static PyModuleDef_Slot tunnel_slots[] = {
    {Py_mod_exec, tunnel_exec},
    {0, NULL},
};

static struct PyModuleDef tunnel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fleetgate.dataplane._tunnel",
    .m_doc = "fleetgate connect's connections, set up and relayed in C",
    .m_size = 0,
    .m_methods = tunnel_functions,
    .m_slots = tunnel_slots,
};

PyMODINIT_FUNC
PyInit__tunnel(void)
{
    return PyModuleDef_Init(&tunnel_module);
}
