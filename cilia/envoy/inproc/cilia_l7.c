/* cilia's L7 parsers inside Envoy: a dynamic-module network filter that embeds CPython.
 *
 * Envoy loads lib<name>.so from $ENVOY_DYNAMIC_MODULES_SEARCH_PATH once per process and calls the
 * hooks below; every per-connection hook runs on that connection's worker thread. This file only
 * moves bytes between Envoy and cilia.envoy.inproc.host, which decides everything:
 *
 *   host.new_filter_config(name: str, config: bytes) -> FilterConfig       (main thread)
 *   FilterConfig.connection() -> Connection                                (per connection)
 *   Connection.read(data, end_stream) / .write(data, end_stream)
 *       -> None (pass the chunk unchanged) or (same_direction: bytes, reply: bytes, close: int)
 *   Connection.close()                                                     (connection gone)
 *
 * Built by cilia.envoy.inproc.build, which checks the pinned Envoy's ABI version and passes its
 * GNU build id: at load time the module compares it with the Envoy it finds itself in and
 * refuses to load into any other (Envoy itself would only warn about an ABI mismatch).
 *
 * The ABI types used are declared here from their documented shapes (Envoy's abi.h is not
 * vendored): a buffer is {const char *ptr; size_t length}, passed by value as two registers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if !defined(CILIA_ABI_VERSION) || !defined(CILIA_ENVOY_BUILD_ID) || !defined(CILIA_PYTHON_HOME) || \
    !defined(CILIA_SITE_DIR) || !defined(CILIA_LIBPYTHON) || !defined(CILIA_MODULE_DIR)
#error "build with python -m cilia.envoy.inproc.build, which defines the CILIA_* macros"
#endif

typedef struct {
  const char *ptr;
  size_t length;
} buffer_t;

enum { STATUS_CONTINUE = 0, STATUS_STOP_ITERATION = 1 };
enum { CLOSE_FLUSH_WRITE = 0, CLOSE_NO_FLUSH = 1 };

/* Callbacks exported by the Envoy binary (resolved when Envoy dlopens this module). */
size_t envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks_size(void *f);
bool envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks(void *f, buffer_t *out);
size_t envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks_size(void *f);
bool envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks(void *f, buffer_t *out);
bool envoy_dynamic_module_callback_network_filter_drain_read_buffer(void *f, size_t length);
bool envoy_dynamic_module_callback_network_filter_drain_write_buffer(void *f, size_t length);
bool envoy_dynamic_module_callback_network_filter_append_read_buffer(void *f, buffer_t data);
bool envoy_dynamic_module_callback_network_filter_append_write_buffer(void *f, buffer_t data);
void envoy_dynamic_module_callback_network_filter_write(void *f, buffer_t data, bool end_stream);
void envoy_dynamic_module_callback_network_filter_close(void *f, int close_type);
uint32_t envoy_dynamic_module_callback_network_filter_get_worker_index(void *f);
bool envoy_dynamic_module_callback_network_get_dynamic_metadata_string(void *f, buffer_t ns, buffer_t key,
                                                                       buffer_t *out);
bool envoy_dynamic_module_callback_network_filter_get_remote_address(void *f, buffer_t *ip, uint32_t *port);
bool envoy_dynamic_module_callback_network_filter_get_local_address(void *f, buffer_t *ip, uint32_t *port);

/* ---------------------------------------------------------------- the interpreter and threads */

static PyObject *host_module;     /* cilia.envoy.inproc.host */
static PyObject *name_read, *name_write, *name_close, *name_connection;
static __thread PyThreadState *thread_state; /* this thread's, created on first use */
static __thread void *current_filter;        /* the Envoy filter whose hook is running */

/* Chunks handed to Python, the time they took with the GIL held, and how many took longer than
 * SLOW_NS (they stalled their worker's every connection). Changed and read with the GIL held. */
#define SLOW_NS 10000000ull
static unsigned long long stat_chunks, stat_ns, stat_slow;

static unsigned long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

static void acquire(void) {
  if (thread_state == NULL) thread_state = PyThreadState_New(PyInterpreterState_Main());
  PyEval_RestoreThread(thread_state);
}

static void release(void) { thread_state = PyEval_SaveThread(); }

static void complain(const char *what) {
  fprintf(stderr, "cilia_l7: %s\n", what);
  fflush(stderr);
}

/* _cilia_inproc: what the host may ask Envoy about the connection whose hook is running. */
static PyObject *py_dynamic_metadata(PyObject *self, PyObject *args) {
  const char *ns, *key;
  Py_ssize_t ns_len, key_len;
  (void)self;
  if (!PyArg_ParseTuple(args, "s#s#", &ns, &ns_len, &key, &key_len)) return NULL;
  if (current_filter == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "no Envoy hook is running on this thread");
    return NULL;
  }
  buffer_t out = {NULL, 0};
  if (!envoy_dynamic_module_callback_network_get_dynamic_metadata_string(
          current_filter, (buffer_t){ns, (size_t)ns_len}, (buffer_t){key, (size_t)key_len}, &out))
    Py_RETURN_NONE;
  return PyUnicode_DecodeUTF8(out.ptr ? out.ptr : "", (Py_ssize_t)out.length, "replace");
}

/* (ip, port) from one of the address callbacks, or None (not an IP connection). */
static PyObject *address_of(bool (*get)(void *, buffer_t *, uint32_t *)) {
  buffer_t ip = {NULL, 0};
  uint32_t port = 0;
  if (!get(current_filter, &ip, &port) || ip.ptr == NULL || ip.length == 0) Py_RETURN_NONE;
  return Py_BuildValue("(s#I)", ip.ptr, (Py_ssize_t)ip.length, (unsigned int)port);
}

static PyObject *py_addresses(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
  if (current_filter == NULL) {
    PyErr_SetString(PyExc_RuntimeError, "no Envoy hook is running on this thread");
    return NULL;
  }
  PyObject *remote = address_of(envoy_dynamic_module_callback_network_filter_get_remote_address);
  PyObject *local = remote ? address_of(envoy_dynamic_module_callback_network_filter_get_local_address) : NULL;
  PyObject *both = local ? PyTuple_Pack(2, remote, local) : NULL;
  Py_XDECREF(remote);
  Py_XDECREF(local);
  return both;
}

static PyObject *py_worker_index(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
  if (current_filter == NULL) return PyLong_FromLong(-1);
  return PyLong_FromUnsignedLong(envoy_dynamic_module_callback_network_filter_get_worker_index(current_filter));
}

static PyObject *py_stats(PyObject *self, PyObject *args) {
  (void)self;
  (void)args;
  return Py_BuildValue("(KKK)", stat_chunks, stat_ns, stat_slow);
}

static PyMethodDef inproc_methods[] = {
    {"stats", py_stats, METH_NOARGS, "stats() -> (chunks, nanoseconds in Python, slow chunks) since Envoy started"},
    {"dynamic_metadata", py_dynamic_metadata, METH_VARARGS,
     "dynamic_metadata(namespace, key) -> str | None: a string of the running connection's dynamic metadata"},
    {"addresses", py_addresses, METH_NOARGS,
     "addresses() -> (remote, local): the running connection's client and server-side (ip, port), each or None"},
    {"worker_index", py_worker_index, METH_NOARGS, "worker_index() -> int: the running connection's Envoy worker"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef inproc_module = {PyModuleDef_HEAD_INIT, "_cilia_inproc",
                                           "Envoy's side of cilia's in-process L7 filter.", -1, inproc_methods,
                                           NULL, NULL, NULL, NULL};

static PyObject *init_inproc_module(void) {
  PyObject *m = PyModule_Create(&inproc_module);
  if (m != NULL && (PyModule_AddStringConstant(m, "ABI_VERSION", CILIA_ABI_VERSION) != 0 ||
                    PyModule_AddStringConstant(m, "MODULE_DIR", CILIA_MODULE_DIR) != 0)) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}

static bool start_python(void) {
  /* Envoy dlopens modules RTLD_LOCAL: make libpython's symbols global, or C extension modules
   * (which expect to find them) fail to import. */
  if (dlopen(CILIA_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD) == NULL &&
      dlopen(CILIA_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL) == NULL) {
    complain(dlerror());
    return false;
  }
  if (PyImport_AppendInittab("_cilia_inproc", init_inproc_module) != 0) return false;
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.install_signal_handlers = 0; /* signals are Envoy's */
  config.parse_argv = 0;
  PyStatus status = PyConfig_SetBytesString(&config, &config.home, CILIA_PYTHON_HOME);
  if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(status)) {
    complain(status.err_msg ? status.err_msg : "Python failed to initialise");
    return false;
  }
  /* .pth files and installed distributions of the venv; PYTHONPATH (from Envoy's environment)
   * stays in front of it. */
  PyObject *site = PyImport_ImportModule("site");
  PyObject *done = site ? PyObject_CallMethod(site, "addsitedir", "s", CILIA_SITE_DIR) : NULL;
  Py_XDECREF(done);
  Py_XDECREF(site);
  host_module = done ? PyImport_ImportModule("cilia.envoy.inproc.host") : NULL;
  name_read = PyUnicode_InternFromString("read");
  name_write = PyUnicode_InternFromString("write");
  name_close = PyUnicode_InternFromString("close");
  name_connection = PyUnicode_InternFromString("connection");
  if (host_module == NULL) {
    PyErr_Print();
    complain("cannot import cilia.envoy.inproc.host");
  }
  thread_state = PyEval_SaveThread(); /* the main thread's, for config hooks */
  return host_module != NULL;
}

/* ---------------------------------------------------------------- which Envoy this is */

static int find_build_id(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  char *hex = data;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type != PT_NOTE) continue;
    const char *p = (const char *)(info->dlpi_addr + ph->p_vaddr), *end = p + ph->p_memsz;
    while (p + sizeof(ElfW(Nhdr)) <= end) {
      const ElfW(Nhdr) *note = (const ElfW(Nhdr) *)p;
      const char *name = p + sizeof(*note);
      const unsigned char *desc = (const unsigned char *)name + ((note->n_namesz + 3) & ~3u);
      if (note->n_type == NT_GNU_BUILD_ID && note->n_namesz == 4 && memcmp(name, "GNU", 4) == 0 &&
          note->n_descsz <= 64) {
        for (unsigned j = 0; j < note->n_descsz; j++) sprintf(hex + 2 * j, "%02x", desc[j]);
        return 1;
      }
      p = (const char *)desc + ((note->n_descsz + 3) & ~3u);
    }
  }
  return 1; /* the first object is the program itself: look no further */
}

/* ---------------------------------------------------------------- module hooks */

const char *envoy_dynamic_module_on_program_init(void) {
  char host_id[129] = "";
  dl_iterate_phdr(find_build_id, host_id);
  if (strcmp(host_id, CILIA_ENVOY_BUILD_ID) != 0) {
    fprintf(stderr,
            "cilia_l7: refusing to load: built for the Envoy with build id %s (dynamic-module ABI %s), "
            "loaded into build id %s; rebuild with python -m cilia.envoy.inproc.build\n",
            CILIA_ENVOY_BUILD_ID, CILIA_ABI_VERSION, host_id[0] ? host_id : "(none)");
    fflush(stderr);
    return NULL;
  }
  return start_python() ? CILIA_ABI_VERSION : NULL;
}

void *envoy_dynamic_module_on_network_filter_config_new(void *config_envoy, buffer_t name, buffer_t config) {
  (void)config_envoy;
  acquire();
  PyObject *made = PyObject_CallMethod(host_module, "new_filter_config", "s#y#", name.ptr, (Py_ssize_t)name.length,
                                       config.ptr, (Py_ssize_t)config.length);
  if (made == NULL) PyErr_Print(); /* NULL rejects the listener: fail closed */
  release();
  return made;
}

void envoy_dynamic_module_on_network_filter_config_destroy(void *config) {
  acquire();
  Py_XDECREF((PyObject *)config);
  release();
}

typedef struct {
  PyObject *conn;
  bool own_write; /* our own write to the client re-enters the write hook: let it through */
  bool closed;
} filter_t;

void *envoy_dynamic_module_on_network_filter_new(void *config, void *filter_envoy) {
  filter_t *f = calloc(1, sizeof(*f));
  if (f == NULL) return NULL;
  acquire();
  current_filter = filter_envoy;
  f->conn = PyObject_CallMethodNoArgs((PyObject *)config, name_connection);
  current_filter = NULL;
  if (f->conn == NULL) PyErr_Print();
  release();
  if (f->conn == NULL) { /* Envoy closes a connection whose filter is NULL */
    free(f);
    return NULL;
  }
  return f;
}

int envoy_dynamic_module_on_network_filter_new_connection(void *filter_envoy, void *filter) {
  (void)filter_envoy;
  (void)filter;
  return STATUS_CONTINUE;
}

/* One chunk through the host. ``read``: from the client (replies go back with write()), else
 * from the server. */
static int on_data(void *fe, filter_t *f, bool read, bool end_stream) {
  size_t (*chunks_size)(void *) = read ? envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks_size
                                       : envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks_size;
  bool (*chunks)(void *, buffer_t *) = read ? envoy_dynamic_module_callback_network_filter_get_read_buffer_chunks
                                            : envoy_dynamic_module_callback_network_filter_get_write_buffer_chunks;
  bool (*drain)(void *, size_t) = read ? envoy_dynamic_module_callback_network_filter_drain_read_buffer
                                       : envoy_dynamic_module_callback_network_filter_drain_write_buffer;
  bool (*append)(void *, buffer_t) = read ? envoy_dynamic_module_callback_network_filter_append_read_buffer
                                          : envoy_dynamic_module_callback_network_filter_append_write_buffer;
  buffer_t stack[16], *parts = stack;
  size_t n = chunks_size(fe), total = 0;
  bool unread = (n > 16 && (parts = malloc(n * sizeof(*parts))) == NULL) || (n && !chunks(fe, parts));
  if (unread) { /* bytes we cannot show the parser must not pass: close (fail closed) */
    if (parts != stack) free(parts);
    f->closed = true;
    envoy_dynamic_module_callback_network_filter_close(fe, CLOSE_NO_FLUSH);
    complain("cannot read a chunk's buffer: connection closed");
  }
  if (f->closed) { /* nothing passes a connection being closed */
    if (parts != stack && !unread) free(parts);
    drain(fe, (size_t)-1); /* all of it: Envoy clamps the length to the buffer's */
    return STATUS_STOP_ITERATION;
  }
  for (size_t i = 0; i < n; i++) total += parts[i].length;
  acquire();
  unsigned long long started = now_ns();
  current_filter = fe;
  int status = STATUS_CONTINUE;
  PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total), *result = NULL;
  if (data != NULL) {
    char *to = PyBytes_AS_STRING(data);
    for (size_t i = 0; i < n; i++) {
      memcpy(to, parts[i].ptr, parts[i].length);
      to += parts[i].length;
    }
    PyObject *args[] = {f->conn, data, end_stream ? Py_True : Py_False};
    result = PyObject_VectorcallMethod(read ? name_read : name_write, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                       NULL);
  }
  if (parts != stack) free(parts);
  const char *same, *reply;
  Py_ssize_t same_len, reply_len;
  int close = 0;
  if (result == NULL || (result != Py_None && !PyArg_ParseTuple(result, "y#y#i", &same, &same_len, &reply,
                                                                &reply_len, &close))) {
    PyErr_Print(); /* the host catches everything it expects; this is a bug: close just this one */
    if (total) drain(fe, total);
    f->closed = true;
    envoy_dynamic_module_callback_network_filter_close(fe, CLOSE_NO_FLUSH);
    status = STATUS_STOP_ITERATION;
  } else if (result != Py_None) {
    if ((size_t)same_len != total || memcmp(same, PyBytes_AS_STRING(data), total) != 0) {
      if (total) drain(fe, total);
      if (same_len) append(fe, (buffer_t){same, (size_t)same_len});
    }
    if (reply_len) {
      f->own_write = true;
      envoy_dynamic_module_callback_network_filter_write(fe, (buffer_t){reply, (size_t)reply_len}, false);
      f->own_write = false;
    }
    if (close) {
      f->closed = true;
      envoy_dynamic_module_callback_network_filter_close(fe, CLOSE_FLUSH_WRITE);
      status = STATUS_STOP_ITERATION;
    }
  }
  Py_XDECREF(result);
  Py_XDECREF(data);
  current_filter = NULL;
  unsigned long long took = now_ns() - started;
  stat_chunks++;
  stat_ns += took;
  if (took > SLOW_NS) stat_slow++;
  release();
  return status;
}

int envoy_dynamic_module_on_network_filter_read(void *fe, void *filter, size_t length, bool end_stream) {
  (void)length;
  return on_data(fe, filter, true, end_stream);
}

int envoy_dynamic_module_on_network_filter_write(void *fe, void *filter, size_t length, bool end_stream) {
  (void)length;
  filter_t *f = filter;
  if (f->own_write) return STATUS_CONTINUE;
  return on_data(fe, f, false, end_stream);
}

void envoy_dynamic_module_on_network_filter_event(void *fe, void *filter, int event) {
  (void)fe;
  (void)filter;
  (void)event;
}

void envoy_dynamic_module_on_network_filter_destroy(void *filter) {
  filter_t *f = filter;
  acquire();
  PyObject *done = PyObject_CallMethodNoArgs(f->conn, name_close);
  if (done == NULL) PyErr_Print();
  Py_XDECREF(done);
  Py_DECREF(f->conn);
  release();
  free(f);
}
