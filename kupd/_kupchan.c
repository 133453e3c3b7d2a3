/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * _kupchan.c -- kupd's CPython extension: libkup with the GIL released.
 *
 * Why C and not ctypes/cffi over libkup.so:
 *   - The turn protocol lives in libkup (load-acquire / store-release of
 *     ctrl->turn, the seq_cst fence pair around the waiting flag, the
 *     short spin then sleep on the wake-up eventfd).  Only C can express
 *     those fences; calling libkup from C keeps them in one place.
 *   - Every blocking call must run with the GIL released, and the
 *     bookkeeping around it (which thread owns the channel, copying the
 *     payload out of the shared area before the next hand-over, bounded
 *     wait slices so ^C and close() from another thread are noticed) has
 *     to happen atomically with respect to other Python threads -- i.e.
 *     while holding the GIL, right before and after the release.  With
 *     ctypes the GIL is dropped around the foreign call only, and the
 *     payload copy and the state checks would be Python code on every
 *     message: slower, and racy for the gateway's thousands of channels.
 *   - send() takes any buffer-protocol object without a Python-level copy
 *     (the one unavoidable copy is into the shared data area); receive()
 *     copies once out of the shared area into the result bytes (the area
 *     is reused at the next hand-over, so it cannot be exported).
 *
 * Why libkup's sources are compiled into this extension (setup.py picks
 * them as kmod/Makefile does) rather than linking kmod/out/libkup.a: the
 * extension then builds from a clean tree (`pip install -e .` does not
 * depend on `make -C kmod` having run first, nor on the archive having
 * been built -fPIC), libkup gets this extension's -Wall -Wextra -Werror
 * and -fvisibility=hidden (its symbols, kernproxy_errno included, stay
 * private to the extension and cannot clash with a libkup.so loaded by
 * something else in the process), and it is still the exact same protocol
 * code as the C clients use -- there is no second implementation.
 *
 * Errors: every KUP_E_* code is turned into an exception by ONE function,
 * kupd.errors.error_for_code (imported at module init); this file only
 * builds the message.  The code -> class mapping lives in kupapi/errors.py
 * (clients/python; kupd.errors re-exports it).
 *
 * Concurrency: libkup allows one thread per channel handle at a time.  A
 * channel object is marked busy (under the GIL) for the duration of each
 * operation; a second thread using the same channel meanwhile gets Busy
 * instead of corrupting it.  close() while another thread is blocked in
 * receive() is deferred: the receiver notices within one wait slice,
 * raises InvalidArgument("closed by another thread") and closes the handle
 * itself.  Device operations (info, attach) are serialised by a lock.
 * A device handle is closed only after its last channel is closed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>   /* PyMemberDef: the Message slots */

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "kup.h"

/* Longest single sleep inside libkup before we look at signals, deadline
 * and close requests again.  An idle waiter wakes this often: negligible
 * CPU, and ^C / close() are noticed within this bound. */
#define WAIT_SLICE_MS 200
/* Payloads at least this large are copied out with the GIL released. */
#define BIG_COPY 65536

static PyObject *error_for_code; /* kupd.errors.error_for_code */
/* kupd.channel.Message and {int: Kind}, registered by kupd.channel at
 * import (set_message_type): exchange() builds its result without running
 * a Python frame (no dataclass __init__: the slots are set directly). */
static PyTypeObject *message_type;
static PyObject *message_kinds;
static Py_ssize_t message_off[3];   /* offsets of its slots data, kind, seq */
static PyObject *str_data, *str_kind, *str_seq, *str_timeout;

/* ------------------------------------------------------------------ */
/* errors                                                               */
/* ------------------------------------------------------------------ */

/* Why a KUP_E_NOTTURN happened, in the caller's terms: libkup's one code
 * covers both wrong sides of the turn, and "not your turn" alone reads as
 * the opposite of the truth for a receive (there it is this side's turn).
 * op: 'r' receive, 's' send (exchange's too), 'p' pass.  NULL for any
 * other code.  It takes the place of libkup's own text ("the turn is on the
 * wrong side for this operation"), which would only say it again. */
static const char *
turn_why(int code, int op, void *h)
{
	if (code != KUP_E_NOTTURN)
		return NULL;
	if (op == 'r')
		return "this side holds the turn (the kernel's message was "
		    "already received); send or pass first";
	/* a channel that keeps unread messages (keep_unread) */
	if (h != NULL && kernproxy_unread(h) == KUP_KIND_DATA)
		return op == 'p' ?
		    "the kernel's message is unread (this side holds the turn); "
		    "receive it first: passing now would drop it" :
		    "the kernel's message is unread (this side holds the turn); "
		    "receive it first: sending now would drop it";
	return "the kernel holds the turn; receive its message first";
}

/* Why an attach got KUP_E_NOTREADY (kup_core_attach): libkup's "not
 * ready" alone does not say that it is the module's move.  KUP_E_NOENT
 * for a channel id: libkup's "no such device or channel" alone leaves
 * open which of the two, and the device is open; how many channels it
 * has would take another round trip to the host (Device.info()). */
static const char *
attach_why(int code, long long want)
{
	if (code == KUP_E_NOENT && want >= 0)
		return ": the device has no channel with this id "
		    "(Device.info().chan_count: how many it has)";
	if (code != KUP_E_NOTREADY)
		return "";
	if (want < 0)
		return ": the module has announced no channel yet "
		    "(kupdev_notify / kupdev_announce)";
	return ": the module has not announced this channel yet "
	    "(kupdev_notify / kupdev_announce)";
}

/* "byte" or "bytes" after a count of n: "send of 1 byte", "of 2 bytes". */
static const char *
bytes_word(Py_ssize_t n)
{
	return n == 1 ? "byte" : "bytes";
}

/* Raise the kupd.errors class for code with a message naming what failed
 * ("what: EKU_NAME: libkup's text"); a non-NULL why replaces libkup's text
 * ("what: EKU_NAME: why").  Always returns NULL. */
static PyObject *
raise_kup_va(int code, int sys_errno, const char *why, const char *fmt, va_list ap)
{
	PyObject *what, *msg = NULL, *exc = NULL;
	const char *text = kernproxy_strerror(code), *colon;
	char name[32];

	what = PyUnicode_FromFormatV(fmt, ap);
	if (what == NULL)
		return NULL;
	/* libkup's text is "EKU_NAME: explanation" (PyUnicode_FromFormat
	 * takes no "%.*s" before Python 3.12) */
	colon = why != NULL ? strchr(text, ':') : NULL;
	if (colon != NULL && (size_t)(colon - text) < sizeof(name)) {
		memcpy(name, text, (size_t)(colon - text));
		name[colon - text] = '\0';
		msg = PyUnicode_FromFormat("%U: %s: %s", what, name, why);
	} else if (code == KUP_E_SYS && sys_errno != 0)
		msg = PyUnicode_FromFormat("%U: %s (%s)", what, text, strerror(sys_errno));
	else
		msg = PyUnicode_FromFormat("%U: %s", what, text);
	if (msg == NULL)
		goto out;
	exc = PyObject_CallFunction(error_for_code, "iOi", code, msg,
	    code == KUP_E_SYS ? sys_errno : 0);
	if (exc == NULL)
		goto out;
	PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
out:
	Py_XDECREF(exc);
	Py_XDECREF(msg);
	Py_DECREF(what);
	return NULL;
}

static PyObject *
raise_kup(int code, int sys_errno, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	(void)raise_kup_va(code, sys_errno, NULL, fmt, ap);
	va_end(ap);
	return NULL;
}

/* raise_kup with why (turn_why) in place of libkup's text when not NULL. */
static PyObject *
raise_kup_why(int code, int sys_errno, const char *why, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	(void)raise_kup_va(code, sys_errno, why, fmt, ap);
	va_end(ap);
	return NULL;
}

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ */
/* Device                                                               */
/* ------------------------------------------------------------------ */

typedef struct {
	PyObject_HEAD
	void *h;                 /* kernproxy_open handle; NULL once released */
	PyThread_type_lock lock; /* serialises info / event fd (one connection) */
	PyObject *name;          /* str, as given to open() */
	Py_ssize_t nchannels;    /* channel objects not yet closed */
	Py_ssize_t attaching;    /* channel() calls inside libkup (GIL-protected) */
	Py_ssize_t calling;      /* info() / event_fd() calls inside libkup, under
	                          * the lock (GIL-protected) */
	int closed;              /* close() was called */
} DeviceObject;

typedef struct {
	PyObject_HEAD
	void *h;                 /* kernproxy_channel handle; NULL once closed */
	DeviceObject *dev;       /* strong reference */
	uint32_t id;
	size_t max_msg;
	int fd;
	int busy;                /* an operation is in progress (GIL released) */
	int close_requested;     /* close() arrived while busy */
} ChannelObject;

static PyTypeObject DeviceType;
static PyTypeObject ChannelType;

static void
device_release_handle(DeviceObject *d)
{
	void *h;

	/* an attach in flight uses the handle without the device lock: the
	 * last of them releases it (device_channel); an info() or event_fd()
	 * in flight uses it under the lock: it releases it on its way out
	 * (device_call_done).  Not waited for here: with a hung host such a
	 * call returns only at libkup's RPC timeout (30 s with kupsim), and
	 * close() runs on kupd's event loop.  Waiting was the only thing
	 * that kept the handle alive under that call; the count does it now,
	 * checked and changed with the GIL held, so exactly one thread --
	 * the last one out -- calls kernproxy_close, after every other use
	 * has returned: no use-after-free of the handle.  The DeviceObject
	 * itself cannot go away under the call either: the thread making it
	 * holds a reference to it (the bound method's self). */
	if (d->attaching > 0 || d->calling > 0)
		return;
	/* Under the device lock all the same: a thread that has taken it for
	 * an info() but not yet the GIL back has not counted itself yet; it
	 * then finds the handle gone and fails (device_lock). */
	if (d->lock != NULL && !PyThread_acquire_lock(d->lock, NOWAIT_LOCK)) {
		Py_BEGIN_ALLOW_THREADS
		PyThread_acquire_lock(d->lock, WAIT_LOCK);
		Py_END_ALLOW_THREADS
	}
	h = d->h;
	d->h = NULL;
	if (d->lock != NULL)
		PyThread_release_lock(d->lock);
	if (h != NULL) {
		Py_BEGIN_ALLOW_THREADS
		kernproxy_close(h);
		Py_END_ALLOW_THREADS
	}
}

/* The end of an info() or event_fd(), GIL held, lock still held: a
 * close() that came meanwhile left the handle to this call (device_close). */
static void
device_call_done(DeviceObject *d)
{
	d->calling--;
	PyThread_release_lock(d->lock);
	if (d->closed && d->calling == 0 && d->attaching == 0 && d->nchannels == 0)
		device_release_handle(d);
}

static int
device_lock(DeviceObject *d)
{
	if (!PyThread_acquire_lock(d->lock, NOWAIT_LOCK)) {
		Py_BEGIN_ALLOW_THREADS
		PyThread_acquire_lock(d->lock, WAIT_LOCK);
		Py_END_ALLOW_THREADS
	}
	if (d->closed || d->h == NULL) {
		PyThread_release_lock(d->lock);
		raise_kup(KUP_E_INVAL, 0, "device %U is closed", d->name);
		return -1;
	}
	d->calling++;
	return 0;
}

static PyObject *
kupchan_open(PyObject *mod, PyObject *arg)
{
	const char *name;
	Py_ssize_t len;
	void *h;
	int code, sys_errno;
	DeviceObject *d;

	(void)mod;
	if (!PyUnicode_Check(arg)) {
		PyErr_Format(PyExc_TypeError, "device name must be str, not %.100s",
		    Py_TYPE(arg)->tp_name);
		return NULL;
	}
	name = PyUnicode_AsUTF8AndSize(arg, &len);
	if (name == NULL)
		return NULL;
	if (len == 0 || strlen(name) != (size_t)len)
		return raise_kup(KUP_E_INVAL, 0, "open %R: empty name or NUL in name", arg);
	Py_BEGIN_ALLOW_THREADS
	h = kernproxy_open(name);
	code = kernproxy_errno;
	sys_errno = errno;
	Py_END_ALLOW_THREADS
	if (h == NULL)
		return raise_kup(code ? code : KUP_E_SYS, sys_errno, "open device %R", arg);

	d = PyObject_New(DeviceObject, &DeviceType);
	if (d == NULL)
		goto fail_close;
	d->h = h;
	d->name = Py_NewRef(arg);
	d->nchannels = 0;
	d->attaching = 0;
	d->calling = 0;
	d->closed = 0;
	d->lock = PyThread_allocate_lock();
	if (d->lock == NULL) {
		Py_DECREF(d); /* dealloc closes h */
		return PyErr_NoMemory();
	}
	return (PyObject *)d;
fail_close:
	kernproxy_close(h);
	return NULL;
}

static void
device_dealloc(DeviceObject *d)
{
	/* Channels hold a reference: none can be open here. */
	device_release_handle(d);
	if (d->lock != NULL)
		PyThread_free_lock(d->lock);
	Py_XDECREF(d->name);
	PyObject_Free(d);
}

static PyObject *
device_info(DeviceObject *d, PyObject *unused)
{
	struct kernproxy_info *info;
	int rc, code, sys_errno;
	uint32_t n;
	PyObject *res = NULL;

	(void)unused;
	info = PyMem_Calloc(1, sizeof(*info)); /* ~1 KiB: keep it off the stack */
	if (info == NULL)
		return PyErr_NoMemory();
	if (device_lock(d) < 0)
		goto out;
	Py_BEGIN_ALLOW_THREADS
	rc = kernproxy_info(d->h, info);
	code = kernproxy_errno;
	sys_errno = errno;
	Py_END_ALLOW_THREADS
	device_call_done(d);
	if (rc != 0) {
		raise_kup(code ? code : KUP_E_SYS, sys_errno, "info on device %U", d->name);
		goto out;
	}
	n = info->chan_count;
	if (n > KUP_MAX_CHANNELS) {
		raise_kup(KUP_E_PROTO, 0, "info on device %U: chan_count %u > %u", d->name,
		    (unsigned)n, (unsigned)KUP_MAX_CHANNELS);
		goto out;
	}
	res = Py_BuildValue("(s#IIIIIIKIy#)", info->name, (Py_ssize_t)strnlen(info->name,
	    sizeof(info->name)), info->abi_version, info->page_size, info->chan_count,
	    info->announced, info->pages, info->max_msg, (unsigned long long)info->notify_gen,
	    info->shutting_down, (const char *)info->attached, (Py_ssize_t)n);
out:
	PyMem_Free(info);
	return res;
}

static PyObject *
device_channel(DeviceObject *d, PyObject *args)
{
	long long want;
	unsigned long long pages = 0;
	size_t id;
	void *h, *dh;
	int code, sys_errno;
	ChannelObject *c;

	if (!PyArg_ParseTuple(args, "L|K:channel", &want, &pages))
		return NULL;
	if (want < -1 || want >= (long long)KUP_MAX_CHANNELS)
		return raise_kup(KUP_E_INVAL, 0, "channel id %lld on device %U: not in [0, %u)",
		    want, d->name, (unsigned)KUP_MAX_CHANNELS);
	if (pages > KUP_MAX_PAGES)
		return raise_kup(KUP_E_INVAL, 0, "channel pages %llu on device %U: more than %u",
		    pages, d->name, (unsigned)KUP_MAX_PAGES);
	id = want < 0 ? KP_CHAN_ANY : (size_t)want;
	if (d->closed || d->h == NULL)
		return raise_kup(KUP_E_INVAL, 0, "device %U is closed", d->name);
	/* Not under the device lock: the host may hold an attach for up to
	 * half a second (a channel its module has not let go of yet), and
	 * info() -- kupd's health check -- must not wait behind a queue of
	 * those.  libkup attaches on a connection of their own; the count
	 * keeps the handle from being released meanwhile. */
	dh = d->h;
	d->attaching++;
	Py_BEGIN_ALLOW_THREADS
	h = kernproxy_channel(dh, id, (size_t)pages);
	code = kernproxy_errno;
	sys_errno = errno;
	Py_END_ALLOW_THREADS
	d->attaching--;
	/* a close() meanwhile left the handle to the last attach (a channel
	 * made here keeps it until that channel closes, as one made before) */
	if (h == NULL && d->attaching == 0 && d->nchannels == 0 && d->closed)
		device_release_handle(d);
	if (h == NULL) {
		if (want < 0)
			return raise_kup(code ? code : KUP_E_SYS, sys_errno,
			    "attach any channel of device %U%s", d->name,
			    attach_why(code, want));
		return raise_kup(code ? code : KUP_E_SYS, sys_errno,
		    "attach channel %lld of device %U%s", want, d->name,
		    attach_why(code, want));
	}
	c = PyObject_New(ChannelObject, &ChannelType);
	if (c == NULL) {
		kernproxy_close(h);
		return NULL;
	}
	c->h = h;
	c->dev = (DeviceObject *)Py_NewRef(d);
	c->id = kernproxy_chan_id(h);
	c->max_msg = kernproxy_max_msg(h);
	c->fd = -1; /* kernproxy_fd() on first fileno(): it switches on poll mode */
	c->busy = 0;
	c->close_requested = 0;
	d->nchannels++;
	return (PyObject *)c;
}

static PyObject *
device_event_fd(DeviceObject *d, PyObject *unused)
{
	int fd, code, sys_errno;

	(void)unused;
	/* the first call may connect and subscribe (kupsim: a blocking
	 * request): not with the GIL held, which would stall every thread */
	if (device_lock(d) < 0)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	fd = kernproxy_dev_fd(d->h);
	code = kernproxy_errno;
	sys_errno = errno;
	Py_END_ALLOW_THREADS
	device_call_done(d);
	if (fd < 0)
		return raise_kup(code ? code : KUP_E_SYS, sys_errno, "event fd of device %U", d->name);
	return PyLong_FromLong(fd);
}

static PyObject *
device_close(DeviceObject *d, PyObject *unused)
{
	(void)unused;
	if (d->closed)
		Py_RETURN_NONE;
	d->closed = 1;
	/* Release the handle unless channels, attaches, or an info() or
	 * event_fd() in flight still use it: the last of them releases it.
	 * Never waits for a call in flight (device_release_handle says why). */
	if (d->nchannels == 0)
		device_release_handle(d);
	Py_RETURN_NONE;
}

static PyObject *
device_get_closed(DeviceObject *d, void *unused)
{
	(void)unused;
	return PyBool_FromLong(d->closed);
}

static PyObject *
device_get_name(DeviceObject *d, void *unused)
{
	(void)unused;
	return Py_NewRef(d->name);
}

static PyMethodDef device_methods[] = {
	{"info", (PyCFunction)device_info, METH_NOARGS,
	 "info() -> (name, abi_version, page_size, chan_count, announced, pages, max_msg,"
	 " notify_gen, shutting_down, attached: bytes)"},
	{"channel", (PyCFunction)device_channel, METH_VARARGS,
	 "channel(chan_id: int (-1: any free), pages: int = 0) -> Channel"},
	{"event_fd", (PyCFunction)device_event_fd, METH_NOARGS,
	 "event_fd() -> int: polls readable on device events"},
	{"close", (PyCFunction)device_close, METH_NOARGS,
	 "close(): idempotent; the handle is released when the last channel closes"},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef device_getset[] = {
	{"closed", (getter)device_get_closed, NULL, "close() was called", NULL},
	{"name", (getter)device_get_name, NULL, "the name given to open()", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DeviceType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "kupd._kupchan.Device",
	.tp_basicsize = sizeof(DeviceObject),
	.tp_dealloc = (destructor)device_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A libkup device handle (use kupd.channel.Device).",
	.tp_methods = device_methods,
	.tp_getset = device_getset,
};

/* ------------------------------------------------------------------ */
/* Channel                                                              */
/* ------------------------------------------------------------------ */

/* Release the libkup handle (sends CLOSE if this side holds the turn) and
 * the device handle if this was its last channel and it was closed. */
static void
channel_release(ChannelObject *c)
{
	void *h = c->h;
	DeviceObject *d = c->dev;

	c->h = NULL;
	if (h == NULL)
		return;
	Py_BEGIN_ALLOW_THREADS
	kernproxy_close(h);
	Py_END_ALLOW_THREADS
	d->nchannels--;
	if (d->nchannels == 0 && d->closed)
		device_release_handle(d);
}

/* Claim the channel for one operation (GIL held).  -1 with an exception
 * when it is closed or another thread is using it. */
static int
channel_enter(ChannelObject *c, const char *op)
{
	if (c->h == NULL || c->close_requested) {
		raise_kup(KUP_E_INVAL, 0, "%s on channel %u of device %U: channel is closed", op,
		    (unsigned)c->id, c->dev->name);
		return -1;
	}
	if (c->busy) {
		raise_kup(KUP_E_BUSY, 0,
		    "%s on channel %u of device %U: another thread is using this channel", op,
		    (unsigned)c->id, c->dev->name);
		return -1;
	}
	c->busy = 1;
	return 0;
}

/* End an operation; performs a close() that arrived meanwhile.  Returns
 * 1 if it did (the caller's result should become an error). */
static int
channel_leave(ChannelObject *c)
{
	c->busy = 0;
	if (c->close_requested) {
		channel_release(c);
		return 1;
	}
	return 0;
}

static void
channel_dealloc(ChannelObject *c)
{
	channel_release(c);
	Py_XDECREF(c->dev);
	PyObject_Free(c);
}

static PyObject *
channel_send(ChannelObject *c, PyObject *arg)
{
	Py_buffer view;
	int rc, code = 0, sys_errno = 0;

	if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
		return NULL;
	if (channel_enter(c, "send") < 0) {
		PyBuffer_Release(&view);
		return NULL;
	}
	if ((size_t)view.len > c->max_msg) {
		c->busy = 0;
		PyBuffer_Release(&view);
		return raise_kup(KUP_E_TOOBIG, 0,
		    "send of %zd %s on channel %u of device %U (max_msg %zu)", view.len,
		    bytes_word(view.len), (unsigned)c->id, c->dev->name, c->max_msg);
	}
	Py_BEGIN_ALLOW_THREADS
	rc = kernproxy_send(c->h, view.buf, (size_t)view.len, 0);
	if (rc != 0) {
		code = kernproxy_errno;
		sys_errno = errno;
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&view);
	if (channel_leave(c) && rc == 0)
		Py_RETURN_NONE; /* sent, then closed as asked */
	if (rc != 0)
		return raise_kup_why(code ? code : KUP_E_SYS, sys_errno,
		    turn_why(code, 's', c->h),
		    "send of %zd %s on channel %u of device %U", view.len,
		    bytes_word(view.len), (unsigned)c->id,
		    c->dev->name);
	Py_RETURN_NONE;
}

static PyObject *
channel_pass(ChannelObject *c, PyObject *unused)
{
	int rc, code = 0, sys_errno = 0;

	(void)unused;
	if (channel_enter(c, "pass") < 0)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = kernproxy_pass(c->h);
	if (rc != 0) {
		code = kernproxy_errno;
		sys_errno = errno;
	}
	Py_END_ALLOW_THREADS
	channel_leave(c);
	if (rc != 0)
		return raise_kup_why(code ? code : KUP_E_SYS, sys_errno,
		    turn_why(code, 'p', c->h),
		    "pass on channel %u of device %U", (unsigned)c->id, c->dev->name);
	Py_RETURN_NONE;
}

/* Build (data: bytes, kind: int, seq: int) from a received message.  The
 * channel is still claimed, so the data area cannot be reused meanwhile. */
static PyObject *
message_data(ChannelObject *c, const struct kernproxy_msg *m)
{
	PyObject *data;

	if (m->len > c->max_msg)  /* libkup checked; never trust twice-removed */
		return raise_kup(KUP_E_PROTO, 0, "receive on channel %u of device %U: length %zu > %zu",
		    (unsigned)c->id, c->dev->name, m->len, c->max_msg);
	if (m->len >= BIG_COPY) {
		data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)m->len);
		if (data == NULL)
			return NULL;
		Py_BEGIN_ALLOW_THREADS
		memcpy(PyBytes_AS_STRING(data), m->data, m->len);
		Py_END_ALLOW_THREADS
	} else {
		data = PyBytes_FromStringAndSize(m->len ? (const char *)m->data : "",
		    (Py_ssize_t)m->len);
		if (data == NULL)
			return NULL;
	}
	return data;
}

static PyObject *
message_tuple(ChannelObject *c, const struct kernproxy_msg *m)
{
	PyObject *data = message_data(c, m);

	if (data == NULL)
		return NULL;
	return Py_BuildValue("(NIK)", data, (unsigned)m->kind, (unsigned long long)m->seq);
}

/* A kupd.channel.Message for a received message, built without a Python
 * frame: allocated by its type and its three slots (still empty) filled at
 * the offsets their member descriptors gave at registration -- what the
 * descriptors' __set__ would do, minus the attribute lookups, which cost
 * 4-5 us cold after an idle second (wake-up figure, FINDINGS session 2). */
static PyObject *
message_object(ChannelObject *c, const struct kernproxy_msg *m)
{
	PyObject *data = NULL, *key = NULL, *kind, *seq = NULL, *obj = NULL;

	if (message_type == NULL) {
		PyErr_SetString(PyExc_RuntimeError,
		    "kupd._kupchan: no Message type registered (import kupd.channel)");
		return NULL;
	}
	key = PyLong_FromUnsignedLong(m->kind);
	if (key == NULL)
		return NULL;
	kind = PyDict_GetItemWithError(message_kinds, key);   /* borrowed */
	Py_DECREF(key);
	if (kind == NULL) {
		if (!PyErr_Occurred())
			raise_kup(KUP_E_PROTO, 0, "receive on channel %u of device %U: unknown kind %u",
			    (unsigned)c->id, c->dev->name, (unsigned)m->kind);
		return NULL;
	}
	data = message_data(c, m);
	if (data == NULL)
		return NULL;
	seq = PyLong_FromUnsignedLongLong((unsigned long long)m->seq);
	if (seq == NULL)
		goto fail;
	obj = message_type->tp_alloc(message_type, 0);
	if (obj == NULL)
		goto fail;
	*(PyObject **)((char *)obj + message_off[0]) = Py_NewRef(data);
	*(PyObject **)((char *)obj + message_off[1]) = Py_NewRef(kind);
	*(PyObject **)((char *)obj + message_off[2]) = Py_NewRef(seq);
fail:
	Py_XDECREF(data);
	Py_XDECREF(seq);
	return obj;
}

/* Milliseconds left before deadline for the next wait slice (at most
 * WAIT_SLICE_MS; timeout_ms < 0: no deadline); 0 when it has passed. */
static int
wait_slice(long long timeout_ms, int64_t deadline)
{
	int64_t left;

	if (timeout_ms < 0)
		return WAIT_SLICE_MS;
	left = deadline - now_ms();
	if (left <= 0)
		return 0;
	return left < WAIT_SLICE_MS ? (int)left : WAIT_SLICE_MS;
}

/* The blocking wait for the kernel's message, the channel claimed; rc,
 * *code and *sys_errno are the outcome of a first slice the caller already
 * waited (rc 1: none yet).  Waits in slices of at most WAIT_SLICE_MS with
 * the GIL released, checking signals and close() between them.  0 with *m
 * filled; -1 with *code (KUP_E_TIMEDOUT when the deadline passed); -2 with
 * a Python exception set (a signal handler raised). */
static int
wait_message(ChannelObject *c, long long timeout_ms, int64_t deadline, int rc,
    int *code, int *sys_errno, struct kernproxy_msg *m)
{
	int slice;

	for (;;) {
		if (rc == 0)
			return 0;
		if (rc != 1) {
			if (!(*code == KUP_E_TIMEDOUT ||
			    (*code == KUP_E_SYS && *sys_errno == EINTR)))
				return -1;
			if (c->close_requested)
				return -1;
			if (PyErr_CheckSignals() < 0)
				return -2;
		}
		slice = wait_slice(timeout_ms, deadline);
		if (slice == 0) {
			*code = KUP_E_TIMEDOUT;
			*sys_errno = 0;
			return -1;
		}
		*code = 0;
		*sys_errno = 0;
		Py_BEGIN_ALLOW_THREADS
		rc = kernproxy_receive_msg(c->h, m, slice);
		if (rc != 0) {
			*code = kernproxy_errno;
			*sys_errno = errno;
		}
		Py_END_ALLOW_THREADS
	}
}

/* The blocking receive.  timeout_ms < 0: forever; > 0: deadline. */
typedef PyObject *(*build_fn)(ChannelObject *, const struct kernproxy_msg *);

static PyObject *
channel_receive_wait(ChannelObject *c, long long timeout_ms, build_fn build)
{
	struct kernproxy_msg m;
	int64_t deadline = timeout_ms < 0 ? 0 : now_ms() + timeout_ms;
	int rc, code = 0, sys_errno = 0;
	PyObject *res;

	if (channel_enter(c, "receive") < 0)
		return NULL;
	rc = wait_message(c, timeout_ms, deadline, 1, &code, &sys_errno, &m);
	if (rc == 0) {
		res = build(c, &m);
		if (channel_leave(c)) {
			Py_XDECREF(res);
			goto closed;
		}
		return res;
	}
	if (rc == -2) {
		(void)channel_leave(c);
		return NULL;
	}
	if (channel_leave(c))
		goto closed;
	if (code == KUP_E_TIMEDOUT)
		return raise_kup(code, 0, "receive on channel %u of device %U: no message within %lld ms",
		    (unsigned)c->id, c->dev->name, timeout_ms);
	return raise_kup_why(code ? code : KUP_E_SYS, sys_errno, turn_why(code, 'r', NULL),
	    "receive on channel %u of device %U", (unsigned)c->id, c->dev->name);
closed:
	return raise_kup(KUP_E_INVAL, 0,
	    "receive on channel %u of device %U: channel was closed by another thread",
	    (unsigned)c->id, c->dev->name);
}

/* Non-blocking receive with the GIL held (a few loads; no sleep).
 * raise_notready: NotReady exception, else None, when nothing is there. */
static PyObject *
channel_receive_now(ChannelObject *c, int raise_notready, build_fn build)
{
	struct kernproxy_msg m;
	int rc, code = 0, sys_errno = 0;
	PyObject *res;

	if (channel_enter(c, "receive") < 0)
		return NULL;
	rc = kernproxy_receive_msg(c->h, &m, 0);
	if (rc != 0) {
		code = kernproxy_errno;
		sys_errno = errno;
	}
	if (rc == 0) {
		/* a large message is copied out with the GIL released
		 * (message_data): a close() from another thread may have
		 * arrived meanwhile, and is carried out here */
		res = build(c, &m);
		if (channel_leave(c)) {
			Py_XDECREF(res);
			return raise_kup(KUP_E_INVAL, 0,
			    "receive on channel %u of device %U: channel was closed by another thread",
			    (unsigned)c->id, c->dev->name);
		}
		return res;
	}
	c->busy = 0;
	if (code == KUP_E_NOTREADY && !raise_notready)
		Py_RETURN_NONE;
	if (code == KUP_E_NOTREADY)
		return raise_kup(code, 0, "receive on channel %u of device %U: the kernel holds the turn",
		    (unsigned)c->id, c->dev->name);
	return raise_kup_why(code ? code : KUP_E_SYS, sys_errno, turn_why(code, 'r', NULL),
	    "receive on channel %u of device %U", (unsigned)c->id, c->dev->name);
}

static PyObject *
channel_receive(ChannelObject *c, PyObject *arg)
{
	long long timeout_ms = PyLong_AsLongLong(arg);

	if (timeout_ms == -1 && PyErr_Occurred())
		return NULL;
	if (timeout_ms < -1)
		return raise_kup(KUP_E_INVAL, 0, "receive on channel %u of device %U: timeout %lld ms",
		    (unsigned)c->id, c->dev->name, timeout_ms);
	if (timeout_ms > ((long long)1 << 40))  /* ~35 years: no deadline overflow */
		timeout_ms = -1;
	if (timeout_ms == 0)
		return channel_receive_now(c, 1, message_tuple);
	return channel_receive_wait(c, timeout_ms, message_tuple);
}

static PyObject *
channel_try_receive(ChannelObject *c, PyObject *unused)
{
	(void)unused;
	return channel_receive_now(c, 0, message_tuple);
}

/* Raise the kupd.errors class for code with exactly this message. */
static PyObject *
raise_plain(int code, PyObject *msg)
{
	PyObject *exc;

	if (msg == NULL)
		return NULL;
	exc = PyObject_CallFunction(error_for_code, "iO", code, msg);
	Py_DECREF(msg);
	if (exc != NULL) {
		PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
		Py_DECREF(exc);
	}
	return NULL;
}

#define FOREVER_MS ((long long)1 << 40)   /* ~35 years: no deadline overflow */

/* exchange()'s timeout in seconds -> milliseconds, as kupd.channel's
 * _timeout_ms: None or inf forever (-1), 0 no wait, otherwise at least
 * 1 ms (rounded up).  -2 with InvalidArgument for anything else. */
static long long
timeout_arg(PyObject *t)
{
	double x, ms;

	if (t == Py_None)
		return -1;
	if (PyBool_Check(t) || !(PyLong_Check(t) || PyFloat_Check(t))) {
		raise_plain(KUP_E_INVAL, PyUnicode_FromFormat(
		    "timeout must be None or seconds (a number), not %R", t));
		return -2;
	}
	if (PyLong_Check(t)) {
		int overflow;
		long long v = PyLong_AsLongLongAndOverflow(t, &overflow);

		if (v == -1 && PyErr_Occurred())
			return -2;
		if (overflow > 0)
			return -1;
		if (overflow < 0 || v < 0) {
			raise_plain(KUP_E_INVAL, PyUnicode_FromFormat(
			    "timeout must be None or >= 0 seconds, not %R", t));
			return -2;
		}
		return v > FOREVER_MS / 1000 ? -1 : v * 1000;
	}
	x = PyFloat_AS_DOUBLE(t);
	if (isnan(x) || x < 0) {
		raise_plain(KUP_E_INVAL, PyUnicode_FromFormat(
		    "timeout must be None or >= 0 seconds, not %R", t));
		return -2;
	}
	if (x == 0)
		return 0;
	ms = ceil(x * 1000.0);
	if (!(ms < (double)FOREVER_MS))   /* also inf */
		return -1;
	return ms < 1 ? 1 : (long long)ms;
}

/* The start of exchange / try_exchange, with the GIL held: take data's
 * buffer, claim the channel, check the size.  0 with the buffer held and
 * the channel claimed; -1 with the exception and neither (nothing was
 * sent: the checks that can refuse happen before the hand-over). */
static int
exchange_begin(ChannelObject *c, PyObject *data, Py_buffer *view, const char *op)
{
	if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0)
		return -1;
	if (channel_enter(c, op) < 0) {
		PyBuffer_Release(view);
		return -1;
	}
	if ((size_t)view->len > c->max_msg) {
		/* leave first: raising may run Python code, and so let a
		 * close() from another thread in while the channel is claimed */
		(void)channel_leave(c);
		raise_kup(KUP_E_TOOBIG, 0, "%s: send of %zd %s on channel %u of device %U (max_msg %zu)",
		    op, view->len, bytes_word(view->len), (unsigned)c->id, c->dev->name, c->max_msg);
		PyBuffer_Release(view);
		return -1;
	}
	return 0;
}

/* exchange(data, timeout): send, then wait for the kernel's answer, one
 * call with the GIL released once (the send and the first wait slice run
 * together).  A refused send sends nothing; a failed wait leaves the data
 * sent and the reply owed to a later receive. */
static PyObject *
channel_exchange(ChannelObject *c, PyObject *const *args, Py_ssize_t nargs,
    PyObject *kwnames)
{
	Py_buffer view;
	struct kernproxy_msg m;
	long long timeout_ms;
	int64_t deadline;
	int src, rc = 1, code = 0, sys_errno = 0, slice;
	Py_ssize_t len, i, nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
	PyObject *res, *data = nargs > 0 ? args[0] : NULL, *timeout = nargs > 1 ? args[1] : NULL;

	/* exchange(data, timeout=None), keywords allowed, as a def would */
	if (nargs > 2) {
		PyErr_Format(PyExc_TypeError, "exchange() takes at most 2 arguments (%zd given)",
		    nargs);
		return NULL;
	}
	for (i = 0; i < nkw; i++) {
		PyObject *k = PyTuple_GET_ITEM(kwnames, i);
		PyObject **slot = PyUnicode_Compare(k, str_data) == 0 ? &data :
		    PyUnicode_Compare(k, str_timeout) == 0 ? &timeout : NULL;

		if (slot == NULL || *slot != NULL) {
			PyErr_Format(PyExc_TypeError, slot == NULL ?
			    "exchange() got an unexpected keyword argument %R" :
			    "exchange() got multiple values for argument %R", k);
			return NULL;
		}
		*slot = args[nargs + i];
	}
	if (data == NULL) {
		PyErr_SetString(PyExc_TypeError, "exchange() missing required argument 'data'");
		return NULL;
	}
	timeout_ms = timeout_arg(timeout != NULL ? timeout : Py_None);
	if (timeout_ms == -2)
		return NULL;
	if (exchange_begin(c, data, &view, "exchange") < 0)
		return NULL;
	len = view.len;
	deadline = timeout_ms < 0 ? 0 : now_ms() + timeout_ms;
	slice = timeout_ms == 0 ? 0 : wait_slice(timeout_ms, deadline);
	Py_BEGIN_ALLOW_THREADS
	src = kernproxy_send(c->h, view.buf, (size_t)len, 0);
	if (src != 0) {
		code = kernproxy_errno;
		sys_errno = errno;
	} else if (timeout_ms == 0 || slice > 0) {
		rc = kernproxy_receive_msg(c->h, &m, slice);
		if (rc != 0) {
			code = kernproxy_errno;
			sys_errno = errno;
		}
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&view);
	if (src != 0) {
		(void)channel_leave(c);
		return raise_kup_why(code ? code : KUP_E_SYS, sys_errno,
		    turn_why(code, 's', c->h),
		    "exchange: send of %zd %s on channel %u of device %U", len,
		    bytes_word(len), (unsigned)c->id,
		    c->dev->name);
	}
	if (timeout_ms != 0)
		rc = wait_message(c, timeout_ms, deadline, rc, &code, &sys_errno, &m);
	else if (rc != 0)
		rc = -1;
	if (rc == 0) {
		res = message_object(c, &m);
		if (channel_leave(c)) {
			Py_XDECREF(res);
			goto closed;
		}
		return res;
	}
	if (rc == -2) {
		(void)channel_leave(c);
		return NULL;
	}
	if (channel_leave(c))
		goto closed;
	if (code == KUP_E_TIMEDOUT || code == KUP_E_NOTREADY)
		return raise_kup(code, 0,
		    "exchange on channel %u of device %U: sent, no reply within %lld ms "
		    "(the reply is owed to a later receive)", (unsigned)c->id, c->dev->name,
		    timeout_ms);
	return raise_kup(code ? code : KUP_E_SYS, sys_errno,
	    "exchange on channel %u of device %U: sent, waiting for the reply", (unsigned)c->id,
	    c->dev->name);
closed:
	return raise_kup(KUP_E_INVAL, 0,
	    "exchange on channel %u of device %U: sent, then the channel was closed by another thread",
	    (unsigned)c->id, c->dev->name);
}

/* try_exchange(data): send, then spin for the channel's adaptive budget
 * (GIL released); the reply, or None if it has not come by then (the
 * reply is owed to a later receive / try_receive).  Never sleeps.  The
 * send is KP_SPIN_NEXT: in poll mode the kernel side writes the fd only if
 * the spin misses, so a caught reply leaves no late wake-up for the loop. */
static PyObject *
channel_try_exchange(ChannelObject *c, PyObject *arg)
{
	Py_buffer view;
	struct kernproxy_msg m;
	int src, rc = -1, code = 0, sys_errno = 0;
	Py_ssize_t len;
	PyObject *res;

	if (exchange_begin(c, arg, &view, "try_exchange") < 0)
		return NULL;
	len = view.len;
	Py_BEGIN_ALLOW_THREADS
	src = kernproxy_send(c->h, view.buf, (size_t)len, KP_SPIN_NEXT);
	if (src != 0) {
		code = kernproxy_errno;
		sys_errno = errno;
	} else {
		rc = kernproxy_receive_spin(c->h, &m);
		if (rc != 0) {
			code = kernproxy_errno;
			sys_errno = errno;
		}
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&view);
	if (src != 0) {
		(void)channel_leave(c);
		return raise_kup_why(code ? code : KUP_E_SYS, sys_errno,
		    turn_why(code, 's', c->h),
		    "try_exchange: send of %zd %s on channel %u of device %U", len,
		    bytes_word(len), (unsigned)c->id, c->dev->name);
	}
	if (rc == 0) {
		res = message_object(c, &m);
		if (channel_leave(c)) {
			Py_XDECREF(res);
			goto closed;
		}
		return res;
	}
	if (channel_leave(c))
		goto closed;
	if (code == KUP_E_NOTREADY)
		Py_RETURN_NONE;
	return raise_kup(code ? code : KUP_E_SYS, sys_errno,
	    "try_exchange on channel %u of device %U: sent, waiting for the reply",
	    (unsigned)c->id, c->dev->name);
closed:
	return raise_kup(KUP_E_INVAL, 0,
	    "try_exchange on channel %u of device %U: sent, then the channel was closed by another "
	    "thread", (unsigned)c->id, c->dev->name);
}

/* receive_message(timeout=None) -> Message: kupd.channel's receive, the
 * timeout in seconds as exchange takes it; no Python frame. */
static PyObject *
channel_receive_message(ChannelObject *c, PyObject *const *args, Py_ssize_t nargs,
    PyObject *kwnames)
{
	PyObject *timeout = nargs > 0 ? args[0] : NULL;
	long long timeout_ms;

	if (nargs > 1 || (kwnames != NULL && (PyTuple_GET_SIZE(kwnames) != 1 || nargs != 0 ||
	    PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), str_timeout) != 0))) {
		PyErr_SetString(PyExc_TypeError, "receive() takes one argument: timeout=None");
		return NULL;
	}
	if (kwnames != NULL)
		timeout = args[0];
	timeout_ms = timeout_arg(timeout != NULL ? timeout : Py_None);
	if (timeout_ms == -2)
		return NULL;
	if (timeout_ms == 0)
		return channel_receive_now(c, 1, message_object);
	return channel_receive_wait(c, timeout_ms, message_object);
}

static PyObject *
channel_try_receive_message(ChannelObject *c, PyObject *unused)
{
	(void)unused;
	return channel_receive_now(c, 0, message_object);
}

static PyObject *
channel_my_turn(ChannelObject *c, PyObject *unused)
{
	int r;

	(void)unused;
	if (c->h == NULL || c->close_requested)
		return raise_kup(KUP_E_INVAL, 0, "my_turn on channel %u of device %U: channel is closed",
		    (unsigned)c->id, c->dev->name);
	r = kernproxy_my_turn(c->h);
	if (r < 0)
		return raise_kup(kernproxy_errno ? kernproxy_errno : KUP_E_SYS, errno,
		    "my_turn on channel %u of device %U", (unsigned)c->id, c->dev->name);
	return PyBool_FromLong(r);
}

static PyObject *
channel_unread(ChannelObject *c, PyObject *unused)
{
	int r;

	(void)unused;
	if (c->h == NULL || c->close_requested)
		return raise_kup(KUP_E_INVAL, 0, "unread on channel %u of device %U: channel is closed",
		    (unsigned)c->id, c->dev->name);
	r = kernproxy_unread(c->h);
	if (r < 0)
		return raise_kup(kernproxy_errno ? kernproxy_errno : KUP_E_SYS, errno,
		    "unread on channel %u of device %U", (unsigned)c->id, c->dev->name);
	return PyLong_FromLong(r);
}

static PyObject *
channel_state(ChannelObject *c, PyObject *unused)
{
	int r;

	(void)unused;
	if (c->h == NULL || c->close_requested)
		return raise_kup(KUP_E_INVAL, 0, "state of channel %u of device %U: channel is closed",
		    (unsigned)c->id, c->dev->name);
	r = kernproxy_state(c->h);
	if (r < 0)
		return raise_kup(kernproxy_errno ? kernproxy_errno : KUP_E_SYS, errno,
		    "state of channel %u of device %U", (unsigned)c->id, c->dev->name);
	return PyLong_FromLong(r);
}

static PyObject *
channel_keep_unread(ChannelObject *c, PyObject *arg)
{
	int rc, on = PyObject_IsTrue(arg);

	if (on < 0)
		return NULL;
	/* claimed like an operation: libkup's send, pass and close, perhaps
	 * running in another thread with the GIL released, read the setting */
	if (channel_enter(c, "keep_unread") < 0)
		return NULL;
	rc = kernproxy_keep_unread(c->h, on);
	if (channel_leave(c))
		return raise_kup(KUP_E_INVAL, 0,
		    "keep_unread on channel %u of device %U: channel was closed by another thread",
		    (unsigned)c->id, c->dev->name);
	if (rc != 0)
		return raise_kup(kernproxy_errno ? kernproxy_errno : KUP_E_SYS, errno,
		    "keep_unread on channel %u of device %U", (unsigned)c->id, c->dev->name);
	Py_RETURN_NONE;
}

static PyObject *
channel_fileno(ChannelObject *c, PyObject *unused)
{
	(void)unused;
	if (c->h == NULL || c->close_requested)
		return raise_kup(KUP_E_INVAL, 0, "fileno on channel %u of device %U: channel is closed",
		    (unsigned)c->id, c->dev->name);
	if (c->busy)
		return raise_kup(KUP_E_BUSY, 0,
		    "fileno on channel %u of device %U: another thread is using this channel",
		    (unsigned)c->id, c->dev->name);
	if (c->fd < 0) {
		/* From now on libkup keeps user_waiting set and the kernel
		 * writes the wake-up fd on every hand-over. */
		c->fd = kernproxy_fd(c->h);
		if (c->fd < 0)
			return raise_kup(kernproxy_errno ? kernproxy_errno : KUP_E_SYS, errno,
			    "fileno on channel %u of device %U", (unsigned)c->id, c->dev->name);
	}
	return PyLong_FromLong(c->fd);
}

static PyObject *
channel_close(ChannelObject *c, PyObject *unused)
{
	(void)unused;
	if (c->busy)
		c->close_requested = 1; /* the thread inside finishes the close */
	else
		channel_release(c);
	Py_RETURN_NONE;
}

static PyObject *
channel_get_id(ChannelObject *c, void *unused)
{
	(void)unused;
	return PyLong_FromUnsignedLong(c->id);
}

static PyObject *
channel_get_max_msg(ChannelObject *c, void *unused)
{
	(void)unused;
	return PyLong_FromSize_t(c->max_msg);
}

static PyObject *
channel_get_closed(ChannelObject *c, void *unused)
{
	(void)unused;
	return PyBool_FromLong(c->h == NULL || c->close_requested);
}

static PyMethodDef channel_methods[] = {
	{"send", (PyCFunction)channel_send, METH_O, "send(buffer): DATA, hand the turn over"},
	{"pass_", (PyCFunction)channel_pass, METH_NOARGS, "pass_(): hand the turn over (PASS)"},
	{"receive", (PyCFunction)channel_receive, METH_O,
	 "receive(timeout_ms: int; -1 forever, 0 non-blocking) -> (data, kind, seq)"},
	{"try_receive", (PyCFunction)channel_try_receive, METH_NOARGS,
	 "try_receive() -> (data, kind, seq) | None, never blocks"},
	{"exchange", (PyCFunction)(void (*)(void))channel_exchange, METH_FASTCALL | METH_KEYWORDS,
	 "exchange(data, timeout: float | None = None) -> Message: send, then wait for the reply"},
	{"try_exchange", (PyCFunction)channel_try_exchange, METH_O,
	 "try_exchange(data) -> Message | None: send, then spin briefly for the reply"},
	{"receive_message", (PyCFunction)(void (*)(void))channel_receive_message,
	 METH_FASTCALL | METH_KEYWORDS,
	 "receive_message(timeout: float | None = None) -> Message (seconds; 0: never wait)"},
	{"try_receive_message", (PyCFunction)channel_try_receive_message, METH_NOARGS,
	 "try_receive_message() -> Message | None, never blocks"},
	{"my_turn", (PyCFunction)channel_my_turn, METH_NOARGS, "my_turn() -> bool"},
	{"state", (PyCFunction)channel_state, METH_NOARGS,
	 "state() -> int: 0 while usable, else the EKU_* code its next operation would fail with"},
	{"unread", (PyCFunction)channel_unread, METH_NOARGS,
	 "unread() -> int: kind of the kernel's message not yet received, 0 if none"},
	{"keep_unread", (PyCFunction)channel_keep_unread, METH_O,
	 "keep_unread(on): a send/pass that would drop an unread DATA message is NotYourTurn"},
	{"fileno", (PyCFunction)channel_fileno, METH_NOARGS, "fileno() -> int"},
	{"close", (PyCFunction)channel_close, METH_NOARGS, "close(): idempotent"},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef channel_getset[] = {
	{"id", (getter)channel_get_id, NULL, "channel index on its device", NULL},
	{"max_msg", (getter)channel_get_max_msg, NULL, "largest message in bytes", NULL},
	{"closed", (getter)channel_get_closed, NULL, "close() was called", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ChannelType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "kupd._kupchan.Channel",
	.tp_basicsize = sizeof(ChannelObject),
	.tp_dealloc = (destructor)channel_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A libkup channel handle (use kupd.channel.Channel).",
	.tp_methods = channel_methods,
	.tp_getset = channel_getset,
};

/* ------------------------------------------------------------------ */
/* module                                                               */
/* ------------------------------------------------------------------ */

static PyObject *
kupchan_strerror(PyObject *mod, PyObject *arg)
{
	long code = PyLong_AsLong(arg);

	(void)mod;
	if (code == -1 && PyErr_Occurred())
		return NULL;
	return PyUnicode_FromString(kernproxy_strerror((int)code));
}

/* set_message_type(Message, {int: Kind}): what exchange() returns.  The
 * class must have object slots named data, kind and seq
 * (kupd.channel.Message: a frozen dataclass with slots). */
static PyObject *
kupchan_set_message_type(PyObject *mod, PyObject *args)
{
	PyObject *cls, *kinds, *names[3] = { str_data, str_kind, str_seq };
	Py_ssize_t off[3];
	int i;

	(void)mod;
	if (!PyArg_ParseTuple(args, "O!O!:set_message_type", &PyType_Type, &cls, &PyDict_Type,
	    &kinds))
		return NULL;
	for (i = 0; i < 3; i++) {
		PyObject *d = PyObject_GetAttr(cls, names[i]);

		if (d == NULL)
			return NULL;
		if (Py_TYPE(d) != &PyMemberDescr_Type ||
		    ((PyMemberDescrObject *)d)->d_common.d_type != (PyTypeObject *)cls ||
		    ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX ||
		    (((PyMemberDescrObject *)d)->d_member->flags & READONLY)) {
			Py_DECREF(d);
			PyErr_Format(PyExc_TypeError,
			    "set_message_type: %R.%U is not a writable object slot of the class "
			    "(it needs __slots__ data, kind, seq)", cls, names[i]);
			return NULL;
		}
		off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
		Py_DECREF(d);
	}
	if (((PyTypeObject *)cls)->tp_itemsize != 0) {
		PyErr_Format(PyExc_TypeError, "set_message_type: %R is variable-sized", cls);
		return NULL;
	}
	for (i = 0; i < 3; i++)
		message_off[i] = off[i];
	Py_XSETREF(message_type, (PyTypeObject *)Py_NewRef(cls));
	Py_XSETREF(message_kinds, Py_NewRef(kinds));
	Py_RETURN_NONE;
}

static PyMethodDef kupchan_methods[] = {
	{"open", kupchan_open, METH_O, "open(name: str) -> Device"},
	{"set_message_type", kupchan_set_message_type, METH_VARARGS,
	 "set_message_type(cls, kinds: dict[int, Kind]): the result type of exchange()"},
	{"strerror", kupchan_strerror, METH_O, "strerror(code: int) -> str"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef kupchan_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "kupd._kupchan",
	.m_doc = "libkup bindings with the GIL released; use kupd.channel.",
	.m_size = -1,
	.m_methods = kupchan_methods,
};

PyMODINIT_FUNC
PyInit__kupchan(void)
{
	PyObject *m = NULL, *errors = NULL;

	if (PyType_Ready(&DeviceType) < 0 || PyType_Ready(&ChannelType) < 0)
		return NULL;
	str_data = PyUnicode_InternFromString("data");
	str_kind = PyUnicode_InternFromString("kind");
	str_seq = PyUnicode_InternFromString("seq");
	str_timeout = PyUnicode_InternFromString("timeout");
	if (str_data == NULL || str_kind == NULL || str_seq == NULL || str_timeout == NULL)
		return NULL;
	errors = PyImport_ImportModule("kupd.errors");
	if (errors == NULL)
		return NULL;
	error_for_code = PyObject_GetAttrString(errors, "error_for_code");
	Py_DECREF(errors);
	if (error_for_code == NULL)
		return NULL;
	m = PyModule_Create(&kupchan_module);
	if (m == NULL)
		goto fail;
	if (PyModule_AddObjectRef(m, "Device", (PyObject *)&DeviceType) < 0 ||
	    PyModule_AddObjectRef(m, "Channel", (PyObject *)&ChannelType) < 0 ||
	    PyModule_AddIntConstant(m, "ABI_VERSION", KUP_ABI_VERSION) < 0 ||
	    PyModule_AddIntConstant(m, "CHAN_ANY", -1) < 0 ||
	    PyModule_AddIntConstant(m, "WAIT_SLICE_MS", WAIT_SLICE_MS) < 0)
		goto fail;
	return m;
fail:
	Py_XDECREF(m);
	Py_CLEAR(error_for_code);
	return NULL;
}
