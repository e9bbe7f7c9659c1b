// The DNS proxy's fast lane (issue 17): UDP queries and answers the Python proxy has already judged
// once, passed on here without Python per datagram.
//
// Python stays the authority. It fills two dicts the lane only reads:
//   routes:   key (client IPv4, server IPv4 + port, the query's bytes after its id)
//             -> (channel, reply fd, route id, refused tail or None, info)
//   released: route id (4 bytes, big endian) + the answer's bytes after its id
//             -> (monotonic deadline, info)
// A query whose key is in `routes` is answered REFUSED (the refused tail after the query's id) or
// sent on the route's upstream channel; its answer, if its key is in `released` and the deadline
// has not passed, goes back to the client from the reply fd (bound to the server's address). Every
// datagram the lane cannot finish (unknown key, an id already waiting on that channel, an answer
// not released before, a send that failed, a truncated datagram) goes to Python whole, in order,
// as an item of `pump()`'s first list; what the lane finished comes back as records, the second.
// Queries unanswered for `timeout` seconds come back from `expire()`.
//
// One Lane per proxy, used from the proxy's loop thread only (the GIL is held throughout).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/random.h>
#include <unistd.h>

#ifndef IP_ORIGDSTADDR
#define IP_ORIGDSTADDR 20
#endif

#define BATCH 32
#define MAX_DGRAM 65535
#define MAX_CHANNELS 256
#define KEY_HEAD 10  // client IPv4 (4), server IPv4 (4), server port (2)

struct pending {
    struct pending *prev, *next;  // in sending order (the oldest first)
    struct sockaddr_in client;
    int channel;
    uint16_t up_id;      // the id the query went upstream with (its slot on the channel)
    unsigned char qid[2];  // the client's id, put back into the answer
    int reply_fd;
    uint32_t route_id;
    PyObject *info;        // the route's info (Python's: what records and answers need)
    double arrived, sent;  // monotonic
    double wall;           // the query's arrival, wall clock
    PyObject *query;       // the query's bytes (Python's, if it must finish the query)
    struct sockaddr_in server;
};

struct channel {
    int fd;
    struct pending **by_id;  // 65,536 slots: the query of each id waiting here
};

typedef struct {
    PyObject_HEAD
    int inbound, epfd;
    PyObject *routes, *released;
    double timeout;
    long max_in_flight, in_flight;
    struct channel channels[MAX_CHANNELS];
    int n_channels;
    struct pending *oldest, *newest;
    unsigned char *bufs;  // BATCH datagrams of MAX_DGRAM
    unsigned long long forwarded, refused, released_n, stray, to_python;
    uint64_t rng;  // xorshift state for upstream ids
} Lane;

static uint16_t random_id(Lane *self) {
    uint64_t x = self->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    self->rng = x;
    return (uint16_t)(x >> 24);
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double wallclock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static PyObject *address(const struct sockaddr_in *a) {
    char text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &a->sin_addr, text, sizeof text);
    return Py_BuildValue("(si)", text, ntohs(a->sin_port));
}

static void unlink_pending(Lane *self, struct pending *p) {
    if (p->prev) p->prev->next = p->next; else self->oldest = p->next;
    if (p->next) p->next->prev = p->prev; else self->newest = p->prev;
    self->channels[p->channel].by_id[p->up_id] = NULL;
    self->in_flight--;
}

static void free_pending(struct pending *p) {
    Py_XDECREF(p->query);
    Py_XDECREF(p->info);
    PyMem_Free(p);
}

static int append_new(PyObject *list, PyObject *item) {  // steals item
    if (item == NULL) return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

// ("query", data, client, server or None, truncated): a datagram from a client for Python.
static int to_python_query(Lane *self, PyObject *slow, const unsigned char *data, size_t len,
                           const struct sockaddr_in *client, const struct sockaddr_in *server, int truncated) {
    self->to_python++;
    PyObject *srv = server ? address(server) : (Py_INCREF(Py_None), Py_None);
    return append_new(slow, Py_BuildValue("(sy#NNO)", "query", (const char *)data, (Py_ssize_t)len, address(client),
                                          srv, truncated ? Py_True : Py_False));
}

static int send_reply(int fd, const void *data, size_t len, const struct sockaddr_in *client) {
    return sendto(fd, data, len, MSG_DONTWAIT, (const struct sockaddr *)client, sizeof *client) < 0 ? -1 : 0;
}

static int on_query(Lane *self, PyObject *slow, PyObject *records, unsigned char *data, size_t len,
                    const struct sockaddr_in *client, const struct sockaddr_in *server, double now) {
    if (len < 12) return to_python_query(self, slow, data, len, client, server, 0);
    PyObject *key = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(KEY_HEAD + len - 2));
    if (key == NULL) return -1;
    char *k = PyBytes_AS_STRING(key);
    memcpy(k, &client->sin_addr, 4);
    memcpy(k + 4, &server->sin_addr, 4);
    memcpy(k + 8, &server->sin_port, 2);
    memcpy(k + KEY_HEAD, data + 2, len - 2);
    PyObject *route = PyDict_GetItemWithError(self->routes, key);  // borrowed
    Py_DECREF(key);
    if (route == NULL) {
        if (PyErr_Occurred()) return -1;
        return to_python_query(self, slow, data, len, client, server, 0);
    }
    if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 5) {
        PyErr_SetString(PyExc_TypeError, "a route is (channel, reply fd, route id, refused tail or None, info)");
        return -1;
    }
    long channel = PyLong_AsLong(PyTuple_GET_ITEM(route, 0));
    long reply_fd = PyLong_AsLong(PyTuple_GET_ITEM(route, 1));
    long route_id = PyLong_AsLong(PyTuple_GET_ITEM(route, 2));
    PyObject *refused = PyTuple_GET_ITEM(route, 3);
    PyObject *info = PyTuple_GET_ITEM(route, 4);
    if (PyErr_Occurred()) return -1;
    double wall = wallclock();
    if (refused != Py_None) {  // denied: REFUSED, never forwarded
        if (!PyBytes_Check(refused) || PyBytes_GET_SIZE(refused) + 2 > MAX_DGRAM) {
            PyErr_SetString(PyExc_TypeError, "a refused tail is bytes");
            return -1;
        }
        unsigned char out[512];
        Py_ssize_t tail = PyBytes_GET_SIZE(refused);
        if (tail + 2 > (Py_ssize_t)sizeof out) return to_python_query(self, slow, data, len, client, server, 0);
        memcpy(out, data, 2);
        memcpy(out + 2, PyBytes_AS_STRING(refused), (size_t)tail);
        if (send_reply((int)reply_fd, out, (size_t)tail + 2, client) < 0)
            return to_python_query(self, slow, data, len, client, server, 0);
        self->refused++;
        // ("refused", wall, client, info, None, latency, upstream)
        return append_new(records, Py_BuildValue("(sdNOOdd)", "refused", wall, address(client), info, Py_None,
                                                 monotonic() - now, 0.0));
    }
    if (channel < 0 || channel >= self->n_channels) {
        PyErr_SetString(PyExc_ValueError, "a route names a channel the lane does not have");
        return -1;
    }
    struct channel *ch = &self->channels[channel];
    if (self->in_flight >= self->max_in_flight)
        return to_python_query(self, slow, data, len, client, server, 0);  // Python counts the overload
    // The query goes upstream under an id of the lane's (random, free on this channel): clients
    // that reuse ids never collide; the answer gets the client's id back.
    uint16_t up_id = random_id(self);
    for (int tries = 0; ch->by_id[up_id] != NULL && tries < 16; tries++) up_id = random_id(self);
    if (ch->by_id[up_id] != NULL) return to_python_query(self, slow, data, len, client, server, 0);
    struct pending *p = PyMem_Malloc(sizeof *p);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    p->info = NULL;
    p->query = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    if (p->query == NULL) {
        PyMem_Free(p);
        return -1;
    }
    memcpy(p->qid, data, 2);
    data[0] = (unsigned char)(up_id >> 8);
    data[1] = (unsigned char)up_id;
    if (send(ch->fd, data, len, MSG_DONTWAIT) < 0) {
        memcpy(data, p->qid, 2);
        free_pending(p);
        return to_python_query(self, slow, data, len, client, server, 0);  // Python sees the error too
    }
    p->client = *client;
    p->server = *server;
    p->channel = (int)channel;
    p->up_id = up_id;
    p->reply_fd = (int)reply_fd;
    p->route_id = (uint32_t)route_id;
    Py_INCREF(info);
    p->info = info;
    p->arrived = now;
    p->sent = monotonic();
    p->wall = wall;
    p->next = NULL;
    p->prev = self->newest;
    if (self->newest) self->newest->next = p; else self->oldest = p;
    self->newest = p;
    ch->by_id[up_id] = p;
    self->in_flight++;
    self->forwarded++;
    return 0;
}

// recvmmsg's headers for a batch into the lane's buffers (sender addresses and ancillary data if asked).
static void batch(Lane *self, struct mmsghdr *msgs, struct iovec *iov, struct sockaddr_in *from, char (*control)[64]) {
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = self->bufs + (size_t)i * MAX_DGRAM;
        iov[i].iov_len = MAX_DGRAM;
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (from != NULL) {
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
            msgs[i].msg_hdr.msg_control = control[i];
            msgs[i].msg_hdr.msg_controllen = sizeof control[i];
        }
    }
}

static int read_inbound(Lane *self, PyObject *slow, PyObject *records) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in from[BATCH];
    char control[BATCH][64];
    for (;;) {
        batch(self, msgs, iov, from, control);
        int n = recvmmsg(self->inbound, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) return 0;  // nothing more now (or an error the next read reports again)
        double now = monotonic();
        for (int i = 0; i < n; i++) {
            struct sockaddr_in server, *srv = NULL;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c; c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)) {
                if (c->cmsg_level == SOL_IP && c->cmsg_type == IP_ORIGDSTADDR &&
                    c->cmsg_len >= CMSG_LEN(sizeof server)) {
                    memcpy(&server, CMSG_DATA(c), sizeof server);
                    srv = &server;
                }
            }
            unsigned char *data = iov[i].iov_base;
            size_t len = msgs[i].msg_len;
            int truncated = (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
            int rc = (srv == NULL || truncated || from[i].sin_family != AF_INET)
                         ? to_python_query(self, slow, data, len, &from[i], srv, truncated)
                         : on_query(self, slow, records, data, len, &from[i], srv, now);
            if (rc < 0) return -1;
        }
        if (n < BATCH) return 0;
    }
}

static int on_answer(Lane *self, PyObject *slow, PyObject *records, int channel, unsigned char *data,
                     size_t len) {
    if (len < 12) {
        self->stray++;
        return 0;
    }
    struct channel *ch = &self->channels[channel];
    uint16_t qid = (uint16_t)(data[0] << 8 | data[1]);
    struct pending *p = ch->by_id[qid];
    if (p == NULL) {  // no query of that id waits here: not an answer of ours (or a late one)
        self->stray++;
        return 0;
    }
    unlink_pending(self, p);
    memcpy(data, p->qid, 2);  // the client's id again
    double now = monotonic();
    PyObject *key = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(4 + len - 2));
    if (key == NULL) {
        free_pending(p);
        return -1;
    }
    char *k = PyBytes_AS_STRING(key);
    uint32_t route = htonl(p->route_id);
    memcpy(k, &route, 4);
    memcpy(k + 4, data + 2, len - 2);
    PyObject *hit = PyDict_GetItemWithError(self->released, key);  // borrowed
    Py_DECREF(key);
    int rc;
    if (hit == NULL && PyErr_Occurred()) {
        rc = -1;
    } else if (hit != NULL && PyTuple_Check(hit) && PyTuple_GET_SIZE(hit) == 2 &&
               PyFloat_AsDouble(PyTuple_GET_ITEM(hit, 0)) > now &&
               send_reply(p->reply_fd, data, len, &p->client) == 0) {
        self->released_n++;
        // ("released", wall, client, info, the answer's info, latency, upstream)
        rc = append_new(records, Py_BuildValue("(sdNOOdd)", "released", p->wall, address(&p->client), p->info,
                                               PyTuple_GET_ITEM(hit, 1), now - p->arrived, now - p->sent));
    } else {  // Python reads it, learns what is new, releases it (and may release its like here next time)
        PyErr_Clear();
        self->to_python++;
        // ("answer", query, answer, client, server, arrived, sent, wall, info)
        rc = append_new(slow, Py_BuildValue("(sOy#NNdddO)", "answer", p->query, (const char *)data, (Py_ssize_t)len,
                                            address(&p->client), address(&p->server), p->arrived, p->sent, p->wall,
                                            p->info));
    }
    free_pending(p);
    return rc;
}

// An error on a channel (ICMP: nobody serves DNS there): every query waiting on it fails, as in
// Python's UdpUpstreams: ("failed", query, client, server, arrived, sent, wall, info, errno) each.
static int fail_channel(Lane *self, PyObject *slow, int channel, int error) {
    struct pending *p = self->oldest;
    while (p != NULL) {
        struct pending *next = p->next;
        if (p->channel == channel) {
            unlink_pending(self, p);
            self->to_python++;
            int rc = append_new(slow, Py_BuildValue("(sONNdddOi)", "failed", p->query, address(&p->client),
                                                    address(&p->server), p->arrived, p->sent, p->wall, p->info,
                                                    error));
            free_pending(p);
            if (rc < 0) return -1;
        }
        p = next;
    }
    return 0;
}

static int read_channel(Lane *self, PyObject *slow, PyObject *records, int channel) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    for (;;) {
        batch(self, msgs, iov, NULL, NULL);
        int n = recvmmsg(self->channels[channel].fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
            return fail_channel(self, slow, channel, errno);
        }
        for (int i = 0; i < n; i++)
            if (on_answer(self, slow, records, channel, iov[i].iov_base, msgs[i].msg_len) < 0) return -1;
        if (n < BATCH) return 0;
    }
}

// pump() -> (slow items, records): everything readable now, without waiting.
static PyObject *Lane_pump(Lane *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *slow = PyList_New(0), *records = PyList_New(0);
    if (slow == NULL || records == NULL) goto fail;
    struct epoll_event events[MAX_CHANNELS + 1];
    int n = epoll_wait(self->epfd, events, MAX_CHANNELS + 1, 0);
    for (int i = 0; i < n; i++) {
        int which = (int)events[i].data.u32;
        int rc = which == 0 ? read_inbound(self, slow, records) : read_channel(self, slow, records, which - 1);
        if (rc < 0) goto fail;
    }
    return Py_BuildValue("(NN)", slow, records);
fail:
    Py_XDECREF(slow);
    Py_XDECREF(records);
    return NULL;
}

// expire() -> [(query, client, server, arrived, sent, wall, info)]: queries unanswered for `timeout`.
static PyObject *Lane_expire(Lane *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    double now = monotonic();
    while (self->oldest != NULL && self->oldest->sent + self->timeout <= now) {
        struct pending *p = self->oldest;
        unlink_pending(self, p);
        int rc = append_new(out, Py_BuildValue("(ONNdddO)", p->query, address(&p->client), address(&p->server),
                                               p->arrived, p->sent, p->wall, p->info));
        free_pending(p);
        if (rc < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

// add_channel(fd) -> index: a connected upstream UDP socket (Python owns and closes it).
static PyObject *Lane_add_channel(Lane *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    if (self->n_channels >= MAX_CHANNELS) {
        PyErr_SetString(PyExc_OverflowError, "the lane has all the channels it can hold");
        return NULL;
    }
    struct pending **by_id = PyMem_Calloc(65536, sizeof *by_id);
    if (by_id == NULL) return PyErr_NoMemory();
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)self->n_channels + 1};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, (int)fd, &ev) < 0) {
        PyMem_Free(by_id);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->channels[self->n_channels].fd = (int)fd;
    self->channels[self->n_channels].by_id = by_id;
    return PyLong_FromLong(self->n_channels++);
}

static PyObject *Lane_stats(Lane *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("{sKsKsKsKsKsl}", "forwarded", self->forwarded, "refused", self->refused, "released",
                         self->released_n, "stray", self->stray, "to_python", self->to_python, "in_flight",
                         self->in_flight);
}

static PyObject *Lane_fileno(Lane *self, PyObject *Py_UNUSED(ignored)) { return PyLong_FromLong(self->epfd); }

static void drop_all(Lane *self) {
    while (self->oldest != NULL) {
        struct pending *p = self->oldest;
        unlink_pending(self, p);
        free_pending(p);
    }
}

// close(): the lane's epoll fd and its queries (the sockets are Python's).
static PyObject *Lane_close(Lane *self, PyObject *Py_UNUSED(ignored)) {
    drop_all(self);
    if (self->epfd >= 0) close(self->epfd);
    self->epfd = -1;
    Py_RETURN_NONE;
}

static int Lane_init(Lane *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"inbound", "routes", "released", "timeout", "max_in_flight", NULL};
    int inbound;
    PyObject *routes, *released;
    double timeout;
    long max_in_flight;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO!O!dl", kw, &inbound, &PyDict_Type, &routes, &PyDict_Type,
                                     &released, &timeout, &max_in_flight))
        return -1;
    if (self->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "a lane is set up once");
        return -1;
    }
    self->bufs = PyMem_Malloc((size_t)BATCH * MAX_DGRAM);
    if (self->bufs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, inbound, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->inbound = inbound;
    if (getentropy(&self->rng, sizeof self->rng) < 0 || self->rng == 0) self->rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    Py_INCREF(routes);
    Py_INCREF(released);
    self->routes = routes;
    self->released = released;
    self->timeout = timeout;
    self->max_in_flight = max_in_flight;
    return 0;
}

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self != NULL) self->epfd = -1;
    return (PyObject *)self;
}

static void Lane_dealloc(Lane *self) {
    drop_all(self);
    if (self->epfd >= 0) close(self->epfd);
    for (int i = 0; i < self->n_channels; i++) PyMem_Free(self->channels[i].by_id);
    PyMem_Free(self->bufs);
    Py_XDECREF(self->routes);
    Py_XDECREF(self->released);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Lane_methods[] = {
    {"pump", (PyCFunction)Lane_pump, METH_NOARGS, "(slow items, records) of what is readable now"},
    {"expire", (PyCFunction)Lane_expire, METH_NOARGS, "queries unanswered for the timeout"},
    {"add_channel", (PyCFunction)Lane_add_channel, METH_O, "a connected upstream socket's fd -> channel"},
    {"stats", (PyCFunction)Lane_stats, METH_NOARGS, "counters"},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS, "the epoll fd: readable when the lane has work"},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "close the epoll fd, drop waiting queries"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_dnslane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Lane_new,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dnslane", "The DNS proxy's fast lane", -1, NULL,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__dnslane(void) {
    if (PyType_Ready(&LaneType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
