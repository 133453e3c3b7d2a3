// SPDX-License-Identifier: BSD-2-Clause
/*
 * kup_linux.c -- the Linux kernel host of KUP: kmod/core/kup_os.h
 * implemented with Linux primitives, plus the character device user space
 * talks to (/dev/kup/<name>, ABI in kmod/include/kup_ioctl.h).
 *
 * Device nodes: kup.ko owns one character major, named "kup" in
 * /proc/devices, and gives each KUP device one minor of it (a cdev plus a
 * struct device of class "kup": /sys/class/kup/<name>, and devtmpfs makes
 * /dev/kup/<name>, mode 0600, root's).  A major of its own rather than misc
 * minors so that a sandbox can allow exactly these nodes: kupd's systemd
 * unit says DeviceAllow=char-kup, where char-misc would also have let it
 * open /dev/kvm, /dev/fuse, /dev/uinput, ...
 *
 * Lifetimes (why nothing can vanish under a mapping):
 *   - an open file holds a reference on its device (kup_core_dev_get);
 *   - a mapping holds its file (vma->vm_file), so the file's release -- and
 *     with it the detach and the device reference -- comes only after the
 *     last munmap as well as the last close;
 *   - the channel memory is freed by the core only when the last device
 *     reference is gone (kup_os_chan_mem_free from the final put);
 *   - file operations are owned by this module (THIS_MODULE), so kup.ko
 *     stays loaded while any file is open; a client module (kup_echo.ko)
 *     may unload at any time: its kupdev_unload shuts the device down and
 *     drops its reference, the softc lives on until the files are gone.
 */
#include <linux/module.h>
#include <linux/version.h>
#include <linux/kernel.h>
#include <linux/fs.h>
#include <linux/mm.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/uaccess.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/kthread.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/hrtimer.h>
#include <linux/moduleparam.h>
#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/idr.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/lockdep.h>
#include <linux/string.h>

#include "kup_os.h"
#include "kup_ioctl.h"

MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("KUP: kernel-user proxy channels over shared pages");

static char *params = "";
module_param(params, charp, 0644);
MODULE_PARM_DESC(params,
    "parameters for KUP modules: \"module.name=int,...\" (kup_os_param_int)");

/* ---- locks ------------------------------------------------------------ */

/* One lockdep class per role (kup_os.h).  Why not mutex_init: its static
 * lock_class_key is per call site, and the core initialises every lock
 * through this one function -- one class for the registry, every device
 * and every channel, so lockdep would take the core's ch->lock -> sc->lock
 * nesting for recursive locking and switch itself off. */
static struct lock_class_key kup_lock_keys[KUP_LOCK_NROLES];
static const char *const kup_lock_names[KUP_LOCK_NROLES] = {
	[KUP_LOCK_CHANNEL]  = "kup_chan_lock",
	[KUP_LOCK_REGISTRY] = "kup_reg_lock",
	[KUP_LOCK_DEVICE]   = "kup_dev_lock",
};

void kup_lock_init(kup_lock_t *l, enum kup_lock_role role)
{
	if ((unsigned int)role >= KUP_LOCK_NROLES)
		role = KUP_LOCK_DEVICE;   /* never: the core passes its enum */
	__mutex_init(l, kup_lock_names[role], &kup_lock_keys[role]);
}

void kup_lock_destroy(kup_lock_t *l)
{
	mutex_destroy(l);
}

void kup_lock(kup_lock_t *l)
{
	mutex_lock(l);
}

void kup_unlock(kup_lock_t *l)
{
	mutex_unlock(l);
}

/* ---- memory ----------------------------------------------------------- */

void *kup_os_zalloc(size_t bytes)
{
	return kvzalloc(bytes, GFP_KERNEL);
}
EXPORT_SYMBOL_GPL(kup_os_zalloc);

void kup_os_free(void *p, size_t bytes)
{
	(void)bytes;
	kvfree(p);
}
EXPORT_SYMBOL_GPL(kup_os_free);

void *kup_os_chan_mem_alloc(struct kupdev_softc *sc, struct kup_chan *ch,
    size_t bytes)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);

	(void)sc;
	oc->ch = ch;
	init_waitqueue_head(&oc->wq);
	spin_lock_init(&oc->user_lock);
	oc->user_wq = NULL;
	atomic_set(&oc->wake_pending, 0);
	if (bytes == 0 || bytes % PAGE_SIZE != 0)
		return NULL;
	/* zeroed and page aligned; mapped page by page (kup_map_pages) */
	oc->mem = vmalloc_user(bytes);
	oc->bytes = oc->mem != NULL ? bytes : 0;
	return oc->mem;
}

void kup_os_chan_mem_free(struct kupdev_softc *sc, struct kup_chan *ch)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);

	(void)sc;
	vfree(oc->mem);
	oc->mem = NULL;
	oc->bytes = 0;
}

uint32_t kup_os_page_size(void)
{
	return (uint32_t)PAGE_SIZE;
}

/* ---- sleeping and waking ---------------------------------------------- */

static long kup_timeout_jiffies(int timeout_ms)
{
	if (timeout_ms < 0)
		return MAX_SCHEDULE_TIMEOUT;
	return (long)msecs_to_jiffies((unsigned int)timeout_ms);
}

/* wait_event_interruptible_timeout re-evaluates cond after queueing itself
 * (prepare_to_wait_event), so a wake_up between the caller's last look and
 * the sleep is never lost. */
static int kup_sleep_result(long r)
{
	if (r > 0)
		return 0;
	if (r == 0)
		return -ETIMEDOUT;
	return -EINTR;
}

int kup_os_chan_sleep(struct kup_chan *ch, int (*cond)(struct kup_chan *),
    int timeout_ms)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);
	long r;

	if (timeout_ms == 0)
		return cond(ch) ? 0 : -ETIMEDOUT;
	r = wait_event_interruptible_timeout(oc->wq, cond(ch),
	    kup_timeout_jiffies(timeout_ms));
	return kup_sleep_result(r);
}

/* A kupdev_receive_any asleep on ch is the core's to wake (its own
 * queue: kup_os_any_wake). */
void kup_os_chan_wake(struct kup_chan *ch)
{
	wake_up_all(&kup_core_chan_os(ch)->wq);
}

/* wait_event_interruptible_timeout's loop (queue, look, sleep), written
 * out so that cond is evaluated once after queueing and once per wake-up
 * -- not also before queueing, as the macro does: kup_os.h's contract
 * for kup_os_any_sleep, whose looks the core counts. */
static int kup_wait_looks(wait_queue_head_t *wq, int (*cond)(void *),
    void *arg, int timeout_ms)
{
	struct wait_queue_entry wait;
	long left = kup_timeout_jiffies(timeout_ms);
	int r;

	init_wait_entry(&wait, 0);
	for (;;) {
		long intr = prepare_to_wait_event(wq, &wait, TASK_INTERRUPTIBLE);

		if (cond(arg)) {
			r = 0;
			break;
		}
		if (intr) {
			r = -EINTR;
			break;
		}
		left = schedule_timeout(left);
		if (left == 0) {
			r = -ETIMEDOUT;
			break;
		}
	}
	finish_wait(wq, &wait);
	return r;
}

/* kupdev_receive_any sleeps on a wait queue of its own (kup_os.h), which
 * the core wakes for the channels of its set only -- the user's
 * KUP_IOC_WAKE included -- and for kupdev_wake_any and the shutdown.  The
 * queue lives in the core's frame of the call; the core wakes it only
 * while it is live (kup_os_any_fini comes after the last waker). */
int kup_os_any_init(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	init_waitqueue_head(&w->wq);
	return 0;
}

void kup_os_any_fini(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	(void)w;
}

int kup_os_any_sleep(struct kupdev_softc *sc, struct kup_os_any *w,
    const int *ids, int n, int (*cond)(void *), void *arg, int timeout_ms)
{
	(void)sc;
	(void)ids;
	(void)n;
	if (timeout_ms == 0)
		return cond(arg) ? 0 : -ETIMEDOUT;
	return kup_wait_looks(&w->wq, cond, arg, timeout_ms);
}

void kup_os_any_wake(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	wake_up_all(&w->wq);
}

/* Like an eventfd: the wake-up stays pending (the fd polls readable) until
 * user space consumes it with read(2) -- libkup's drain.  Pending before
 * the wake_up, so a poller that wakes always sees it.  The pollers wait on
 * the attached file's queue, not the channel's: epoll registers a file's
 * queues once, at EPOLL_CTL_ADD, and a file added before its ATTACH would
 * never hear of its channel. */
void kup_os_chan_wake_user(struct kup_chan *ch)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);

	atomic_set(&oc->wake_pending, 1);
	smp_mb__after_atomic();
	spin_lock(&oc->user_lock);
	if (oc->user_wq != NULL)
		wake_up_all(oc->user_wq);
	spin_unlock(&oc->user_lock);
}

/* Route the channel's user wake-ups to a file's queue (NULL: to nobody).
 * Clearing under the lock means no wake-up touches the queue afterwards. */
static void kup_chan_set_user_wq(struct kup_chan *ch, wait_queue_head_t *q,
    wait_queue_head_t *only_if)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);

	spin_lock(&oc->user_lock);
	if (only_if == NULL || oc->user_wq == only_if)
		oc->user_wq = q;
	spin_unlock(&oc->user_lock);
}

static void kup_os_dev_init_wq(struct kup_os_dev *od)
{
	if (!od->wq_ready) {
		init_waitqueue_head(&od->wq);
		init_waitqueue_head(&od->poll_wq);
		od->wq_ready = 1;
	}
}

int kup_os_dev_sleep(struct kupdev_softc *sc,
    int (*cond)(struct kupdev_softc *), int timeout_ms)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);
	long r;

	if (timeout_ms == 0)
		return cond(sc) ? 0 : -ETIMEDOUT;
	r = wait_event_interruptible_timeout(od->wq, cond(sc),
	    kup_timeout_jiffies(timeout_ms));
	return kup_sleep_result(r);
}

void kup_os_dev_wake(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);

	if (od->wq_ready)
		wake_up_all(&od->wq);
}

void kup_os_dev_wake_user(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);

	if (od->wq_ready)
		wake_up_all(&od->poll_wq);
}

/* ---- diagnostics, module helpers -------------------------------------- */

void kup_os_log(const char *fmt, ...)
{
	struct va_format vaf;
	va_list ap;

	va_start(ap, fmt);
	vaf.fmt = fmt;
	vaf.va = &ap;
	pr_info("%pV\n", &vaf);   /* callers name themselves ("kup: ", "echo: ") */
	va_end(ap);
}
EXPORT_SYMBOL_GPL(kup_os_log);

void kup_os_msleep(unsigned int ms)
{
	msleep(ms);
}
EXPORT_SYMBOL_GPL(kup_os_msleep);

/* kup_os.h: in the attaching process's ioctl; a signal ends the sleep.
 * An hrtimer sleep, not msleep_interruptible(1): that is two jiffies (8 ms
 * at HZ=250), and the pause is what a channel its module has just let go
 * of waits for. */
int kup_os_attach_pause(void)
{
	ktime_t t = ms_to_ktime(1);

	set_current_state(TASK_INTERRUPTIBLE);
	schedule_hrtimeout_range(&t, 500 * NSEC_PER_USEC, HRTIMER_MODE_REL);
	return signal_pending(current) ? -EINTR : 0;
}

/* CLOCK_MONOTONIC, as user space reads it */
u64 kup_os_now_ns(void)
{
	return ktime_get_ns();
}
EXPORT_SYMBOL_GPL(kup_os_now_ns);

/* kup.params="echo.channels=4,echo.pages=2": module.name=int pairs.  The
 * string may be rewritten through sysfs at any time: read it under the
 * module's parameter lock.  The value is parsed by the core, by the one
 * rule of kup_module.h (decimal only; malformed or out of range: logged,
 * defval) -- not kstrtoint(base 0), which read "010" as 8 and "0x10" as
 * 16 where kupsim and FreeBSD did not, and said nothing about a typo. */
static int kup_param_lookup(const char *p, const char *module,
    const char *name, int defval)
{
	size_t ml = strlen(module), nl = strlen(name);

	while (p != NULL && *p != '\0') {
		const char *end = strchrnul(p, ',');
		size_t len = (size_t)(end - p);

		/* `echo ... > /sys/module/kup/parameters/params` stores the
		 * newline echo appends: it ends the string, not the value */
		while (*end == '\0' && len > 0 && p[len - 1] == '\n')
			len--;

		if (len >= ml + nl + 2 && strncmp(p, module, ml) == 0 &&
		    p[ml] == '.' && strncmp(p + ml + 1, name, nl) == 0 &&
		    p[ml + 1 + nl] == '=')
			return kup_core_param_value(module, name, "kup.params",
			    p + ml + nl + 2, len - (ml + nl + 2), defval);
		p = *end == ',' ? end + 1 : end;
	}
	return defval;
}

int kup_os_param_int(const char *module, const char *name, int defval)
{
	int v;

	if (module == NULL || name == NULL)
		return defval;
	kernel_param_lock(THIS_MODULE);
	v = kup_param_lookup(params, module, name, defval);
	kernel_param_unlock(THIS_MODULE);
	return v;
}
EXPORT_SYMBOL_GPL(kup_os_param_int);

int kup_os_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
EXPORT_SYMBOL_GPL(kup_os_snprintf);

/* Each mutex its own lockdep class, under the module's name for it: with
 * mutex_init's one static key, every kup_mutex would share a class, and a
 * module nesting two of them would be reported as recursive locking.
 * (Without CONFIG_LOCKDEP, the key and its registration are nothing.)
 *
 * owner: who holds it, for the misuse a Debian kernel (no DEBUG_MUTEXES)
 * does not report -- a second lock by the holder (a deadlock on itself),
 * an unlock by a thread that does not hold it (it would release another
 * thread's hold), a free while locked.  Only ever compared with current,
 * never dereferenced.  A bare task pointer would not do: a holder that
 * exits without unlocking (a module bug) leaves it pointing at freed
 * memory, which the next task may get -- and that task's current equals
 * it, so its unlock was taken for the holder's (and released the dead
 * holder's lock: mutex_unlock's own owner check compares the same
 * address) and its lock for a second lock by the holder (it went on
 * without the lock).  So the holder is pinned (get_task_struct) for as
 * long as owner names it: set after mutex_lock, cleared before
 * mutex_unlock and unpinned after, all by the holder.  A pinned
 * task_struct is never reused, so owner == current holds only for the
 * thread that locked it and has not unlocked it, even when read without
 * the lock (any other thread reads NULL or another, live or pinned,
 * task).  A holder that exits holding it stays pinned -- one task_struct
 * leaked with the mutex, as kup_os_mutex_free leaks the mutex. */
struct kup_mutex {
	struct mutex mtx;
	struct lock_class_key key;
	struct task_struct *owner;  /* the holder, pinned; NULL: unlocked */
	char name[32];
};

struct kup_mutex *kup_os_mutex_new(const char *name)
{
	struct kup_mutex *m = kzalloc(sizeof(*m), GFP_KERNEL);

	if (m == NULL)
		return NULL;
	strscpy(m->name, name != NULL ? name : "kup module", sizeof(m->name));
	lockdep_register_key(&m->key);
	__mutex_init(&m->mtx, m->name, &m->key);
	return m;
}
EXPORT_SYMBOL_GPL(kup_os_mutex_new);

void kup_os_mutex_lock(struct kup_mutex *m)
{
	if (READ_ONCE(m->owner) == current) {
		/* would deadlock on itself: say so, and go on holding it */
		kup_os_log("kup: mutex %s: lock: already held by this thread "
		    "(a module bug: not recursive)", m->name);
		return;
	}
	mutex_lock(&m->mtx);
	get_task_struct(current);
	WRITE_ONCE(m->owner, current);
}
EXPORT_SYMBOL_GPL(kup_os_mutex_lock);

void kup_os_mutex_unlock(struct kup_mutex *m)
{
	if (READ_ONCE(m->owner) != current) {
		/* a mutex_unlock here would release another thread's hold */
		kup_os_log("kup: mutex %s: unlock: not held by this thread "
		    "(a module bug; left as it is)", m->name);
		return;
	}
	WRITE_ONCE(m->owner, NULL);
	mutex_unlock(&m->mtx);
	put_task_struct(current);   /* never the last reference: it runs */
}
EXPORT_SYMBOL_GPL(kup_os_mutex_unlock);

void kup_os_mutex_free(struct kup_mutex *m)
{
	if (m == NULL)
		return;
	if (READ_ONCE(m->owner) != NULL) {
		/* left allocated: its holder may still unlock it (or has
		 * exited holding it, and stays pinned) */
		kup_os_log("kup: mutex %s: free: still locked (a module bug; not freed)",
		    m->name);
		return;
	}
	mutex_destroy(&m->mtx);
	lockdep_unregister_key(&m->key);
	kfree(m);
}
EXPORT_SYMBOL_GPL(kup_os_mutex_free);

struct kup_thread {
	struct task_struct *task;
	int (*fn)(void *);
	void *arg;
	struct completion done;
};

static int kup_thread_main(void *p)
{
	struct kup_thread *t = p;
	int r = t->fn(t->arg);

	complete(&t->done);
	return r;
}

struct kup_thread *kup_os_thread_start(int (*fn)(void *), void *arg,
    const char *name)
{
	struct kup_thread *t = kzalloc(sizeof(*t), GFP_KERNEL);
	struct task_struct *task;

	if (t == NULL)
		return NULL;
	t->fn = fn;
	t->arg = arg;
	init_completion(&t->done);
	task = kthread_create(kup_thread_main, t, "kup-%s", name);
	if (IS_ERR(task)) {
		kfree(t);
		return NULL;
	}
	/* keep the task_struct: kthread_stop() after the thread exited */
	get_task_struct(task);
	t->task = task;
	wake_up_process(task);
	return t;
}
EXPORT_SYMBOL_GPL(kup_os_thread_start);

int kup_os_thread_join(struct kup_thread *t)
{
	int r;

	/* fn has returned once done completes; kthread_stop then collects its
	 * value (waiting only for the last instructions of the thread) */
	wait_for_completion(&t->done);
	r = kthread_stop(t->task);
	put_task_struct(t->task);
	kfree(t);
	return r;
}
EXPORT_SYMBOL_GPL(kup_os_thread_join);

/* ---- the character device --------------------------------------------- */

/* One open file description: a device handle, at most one channel. */
struct kup_file {
	struct kupdev_softc *sc;      /* referenced */
	struct mutex lock;            /* ch, attaching, seen_gen; held briefly:
	                               * never across a user copy or a wait
	                               * (mmap takes it under mmap_lock) */
	struct kup_chan *ch;          /* attached channel or NULL */
	bool attaching;               /* an ATTACH is in progress */
	wait_queue_head_t poll_wq;    /* this file's pollers: its channel's
	                               * wake-ups (kup_chan_set_user_wq) */
	uint64_t seen_gen;            /* notify_gen last reported by INFO */
};

static int kup_dev_is_gone(struct kupdev_softc *sc)
{
	return READ_ONCE(kup_core_dev_os(sc)->withdrawn);
}

/* One published device node: a minor of the "kup" major.  The struct
 * device owns the memory (kup_node_free, its release); the cdev holds a
 * reference on it (cdev_device_add makes the device the cdev's parent) and
 * every open file holds the cdev, so a node outlives the device's withdraw
 * for as long as a file opened through it is open or being opened.  It keeps
 * its own copy of the name: the softc may be gone before the node is. */
struct kup_node {
	struct device dev;
	struct cdev cdev;
	struct list_head link;        /* kup_nodes, while published */
	struct kupdev_softc *sc;      /* NULL once withdrawn (kup_nodes_lock) */
	char name[KUP_NAME_MAX];
	int minor;                    /* from kup_minors */
};

#define KUP_MINORS 256            /* devices published at once */

static dev_t kup_devt;            /* first dev_t of the region */
static DEFINE_IDA(kup_minors);
/* kup_nodes and every node's sc.  Lock order: kup_nodes_lock before the
 * core's locks (open looks the device up while holding it); it is never
 * taken with a core lock held (publish, withdraw and release are called
 * without one, and no kup_core_dev_put runs under it). */
static DEFINE_MUTEX(kup_nodes_lock);
static LIST_HEAD(kup_nodes);

static int kup_fop_open(struct inode *inode, struct file *file)
{
	/* chrdev_open holds a reference on the cdev, so on the node */
	struct kup_node *node = container_of(inode->i_cdev, struct kup_node, cdev);
	struct kup_file *kf;
	struct kupdev_softc *sc;
	struct kup_ioc_info *info;
	int r;

	/* The node's device cannot be withdrawn (and so cannot be freed) while
	 * kup_nodes_lock is held.  Look it up by name to take a reference;
	 * this also refuses a device already shutting down.  A node withdrawn
	 * already (an open racing unload, or a stale inode) has no device. */
	mutex_lock(&kup_nodes_lock);
	sc = node->sc != NULL ? kup_core_dev_get(node->name) : NULL;
	if (sc != NULL && sc != node->sc) {
		mutex_unlock(&kup_nodes_lock);
		kup_core_dev_put(sc);          /* never ours: cannot be */
		return -ENODEV;
	}
	mutex_unlock(&kup_nodes_lock);
	if (sc == NULL)
		return -ENODEV;
	kf = kzalloc(sizeof(*kf), GFP_KERNEL);
	info = kmalloc(sizeof(*info), GFP_KERNEL);
	if (kf == NULL || info == NULL) {
		r = -ENOMEM;
		goto fail;
	}
	kup_core_info(sc, info);
	kf->sc = sc;
	kf->seen_gen = info->notify_gen;
	mutex_init(&kf->lock);
	init_waitqueue_head(&kf->poll_wq);
	kfree(info);
	file->private_data = kf;
	return nonseekable_open(inode, file);
fail:
	kfree(info);
	kfree(kf);
	kup_core_dev_put(sc);
	return r;
}

/* Last reference to the open file: every fd closed AND every mapping gone
 * (process death included). */
static int kup_fop_release(struct inode *inode, struct file *file)
{
	struct kup_file *kf = file->private_data;

	(void)inode;
	if (kf->ch != NULL) {
		kup_chan_set_user_wq(kf->ch, NULL, &kf->poll_wq);
		kup_core_detach(kf->ch);
	}
	kup_core_dev_put(kf->sc);
	mutex_destroy(&kf->lock);
	kfree(kf);
	return 0;
}

static long kup_ioc_attach(struct kup_file *kf, void __user *uarg)
{
	struct kup_ioc_attach a;
	struct kup_ioc_info *info = NULL;
	struct kup_chan *ch = NULL;
	const struct kup_ctrl *ctrl;
	size_t i;
	long r;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.reserved_in != 0)
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(a.reserved); i++)
		if (a.reserved[i] != 0)
			return -EINVAL;
	/* a caller built for another ABI learns that first, whatever else
	 * it asked for */
	if (a.abi_version != KUP_ABI_VERSION)
		return -EPROTONOSUPPORT;
	info = kmalloc(sizeof(*info), GFP_KERNEL);
	if (info == NULL)
		return -ENOMEM;
	/* Claim the file, then attach without its lock: the attach may wait up
	 * to KUP_ATTACH_LETGO_MS and the copy out may fault (taking mmap_lock,
	 * which mmap holds when it takes kf->lock). */
	mutex_lock(&kf->lock);
	if (kf->ch != NULL || kf->attaching) {
		mutex_unlock(&kf->lock);
		kfree(info);
		return -EBUSY;        /* one channel per open file */
	}
	kf->attaching = true;
	mutex_unlock(&kf->lock);
	kup_core_info(kf->sc, info);
	if (info->shutting_down) {
		r = -ESHUTDOWN;
		goto out;
	}
	if (a.pages != 0 && a.pages != info->pages) {
		r = -EINVAL;
		goto out;
	}
	r = kup_core_attach(kf->sc, a.chan_id, a.abi_version, &ch);
	if (r != 0)
		goto out;
	/* nothing of an earlier attachment is pending for this user */
	atomic_set(&kup_core_chan_os(ch)->wake_pending, 0);
	kup_chan_set_user_wq(ch, &kf->poll_wq, NULL);
	ctrl = kup_core_chan_mem(ch);
	a.chan_id = kup_core_chan_id(ch);
	a.page_size = info->page_size;
	a.chan_count = info->chan_count;
	a.dev_pages = info->pages;
	a.map_offset = 0;
	a.map_size = kup_core_chan_bytes(ch);
	a.attach_gen = READ_ONCE(ctrl->attach_gen);
	if (copy_to_user(uarg, &a, sizeof(a))) {
		kup_chan_set_user_wq(ch, NULL, &kf->poll_wq);
		kup_core_detach(ch);
		ch = NULL;
		r = -EFAULT;
		goto out;
	}
	r = 0;
out:
	mutex_lock(&kf->lock);
	kf->ch = ch;
	kf->attaching = false;
	mutex_unlock(&kf->lock);
	kfree(info);
	return r;
}

/* A device event that an INFO or a read(2) took but could not copy out
 * (a bad buffer: EFAULT) is given back -- unless a newer look has moved
 * seen_gen on meanwhile, which reported the event. */
static void kup_file_unsee_gen(struct kup_file *kf, uint64_t old_gen,
    uint64_t new_gen)
{
	mutex_lock(&kf->lock);
	if (kf->seen_gen == new_gen)
		kf->seen_gen = old_gen;
	mutex_unlock(&kf->lock);
}

static long kup_ioc_info(struct kup_file *kf, void __user *uarg)
{
	struct kup_ioc_info *ui;
	uint64_t old_gen;
	long r = 0;

	/* Unloaded (node withdrawn): the device is gone, as for kupsim's closed
	 * socket and FreeBSD's destroy_dev; user space reopens by name.  While
	 * only shutting down, INFO still answers (shutting_down = 1). */
	if (kup_dev_is_gone(kf->sc))
		return -ESHUTDOWN;
	ui = kmalloc(sizeof(*ui), GFP_KERNEL);
	if (ui == NULL)
		return -ENOMEM;
	kup_core_info(kf->sc, ui);
	mutex_lock(&kf->lock);
	if (kf->ch != NULL)
		ui->attached_chan = kup_core_chan_id(kf->ch);
	old_gen = kf->seen_gen;
	kf->seen_gen = ui->notify_gen;
	mutex_unlock(&kf->lock);
	if (copy_to_user(uarg, ui, sizeof(*ui))) {
		if (old_gen != ui->notify_gen)
			kup_file_unsee_gen(kf, old_gen, ui->notify_gen);
		r = -EFAULT;
	}
	kfree(ui);
	return r;
}

static long kup_fop_ioctl(struct file *file, unsigned int cmd,
    unsigned long arg)
{
	struct kup_file *kf = file->private_data;
	struct kup_chan *ch;

	/* Taking a channel means writing into it: only on files opened for
	 * writing, as on FreeBSD (a read-only file may still ask INFO). */
	if ((cmd == KUP_IOC_ATTACH || cmd == KUP_IOC_WAKE) &&
	    !(file->f_mode & FMODE_WRITE))
		return -EBADF;
	switch (cmd) {
	case KUP_IOC_ATTACH:
		return kup_ioc_attach(kf, (void __user *)arg);
	case KUP_IOC_INFO:
		return kup_ioc_info(kf, (void __user *)arg);
	case KUP_IOC_WAKE:
		mutex_lock(&kf->lock);
		ch = kf->ch;
		mutex_unlock(&kf->lock);
		if (ch == NULL)
			return -EINVAL;
		kup_core_user_wake(ch);
		return 0;
	default:
		return -ENOTTY;
	}
}

/*
 * Map the channel's vmalloc pages as raw page frames (VM_PFNMAP), one
 * remap_pfn_range per page, not remap_vmalloc_range: a page inserted as a
 * struct page can be pinned by get_user_pages -- vmsplice into a pipe, an
 * io_uring fixed buffer, O_DIRECT -- and a pin outlives the attachment, so
 * a previous user could read (or write) the next user's messages through
 * it: the channel memory is reused for every attachment.  A PFNMAP mapping
 * refuses every pin (EFAULT).  The pages still outlive every mapping: a
 * mapping holds its file, the file a device reference, and the memory is
 * freed only with the last one (see the top of this file).
 */
static int kup_map_pages(struct vm_area_struct *vma, void *mem,
    unsigned long pgoff)
{
	unsigned long addr;
	char *p = (char *)mem + (pgoff << PAGE_SHIFT);
	int r;

	for (addr = vma->vm_start; addr < vma->vm_end;
	    addr += PAGE_SIZE, p += PAGE_SIZE) {
		r = remap_pfn_range(vma, addr, vmalloc_to_pfn(p), PAGE_SIZE,
		    vma->vm_page_prot);
		if (r != 0)
			return r;   /* the failed mmap unmaps what was done */
	}
	return 0;
}

static int kup_fop_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct kup_file *kf = file->private_data;
	struct kup_chan *ch;
	unsigned long len = vma->vm_end - vma->vm_start;
	unsigned long pgoff = vma->vm_pgoff;
	size_t bytes;
	void *mem;

	mutex_lock(&kf->lock);
	ch = kf->ch;
	mutex_unlock(&kf->lock);
	if (ch == NULL)
		return -EINVAL;             /* attach first */
	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;             /* the pages only make sense shared */
	if (vma->vm_flags & VM_EXEC)
		return -EINVAL;             /* data, never code */
	bytes = kup_core_chan_bytes(ch);
	mem = kup_core_chan_mem(ch);
	/* the whole window [pgoff, pgoff + len) inside the channel; no
	 * overflow: pgoff is compared before it is shifted */
	if (pgoff >= (bytes >> PAGE_SHIFT) ||
	    len > bytes - (pgoff << PAGE_SHIFT))
		return -EINVAL;
	/* never grow by mremap, never in a core dump, never made executable
	 * later by mprotect */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_mod(vma, VM_DONTEXPAND | VM_DONTDUMP, VM_MAYEXEC);
#else
	vma->vm_flags |= VM_DONTEXPAND | VM_DONTDUMP;
	vma->vm_flags &= ~VM_MAYEXEC;
#endif
	return kup_map_pages(vma, mem, pgoff);
}

static __poll_t kup_fop_poll(struct file *file, poll_table *wait)
{
	struct kup_file *kf = file->private_data;
	struct kup_os_dev *od = kup_core_dev_os(kf->sc);
	struct kup_chan *ch;
	__poll_t mask = 0;

	mutex_lock(&kf->lock);
	ch = kf->ch;
	mutex_unlock(&kf->lock);
	if (ch != NULL) {
		const struct kup_ctrl *ctrl = kup_core_chan_mem(ch);
		struct kup_os_chan *oc = kup_core_chan_os(ch);
		uint32_t state;

		poll_wait(file, &kf->poll_wq, wait);
		poll_wait(file, &od->poll_wq, wait);
		/* Readable while a wake-up is pending (hand-over seen with
		 * user_waiting set, shutdown, protocol error) until read(2)
		 * consumes it; HUP / ERR are final states.  The page is
		 * user-writable: a user who scribbles on it only confuses its
		 * own poll.  Shutdown is also known privately. */
		state = READ_ONCE(ctrl->state);
		if (atomic_read(&oc->wake_pending))
			mask |= EPOLLIN | EPOLLRDNORM;
		if ((state & KUP_STATE_SHUTDOWN) || kup_dev_is_gone(kf->sc))
			mask |= EPOLLIN | EPOLLRDNORM | EPOLLHUP;
		if (state & KUP_STATE_PEER_GONE)
			mask |= EPOLLIN | EPOLLRDNORM | EPOLLERR;
	} else {
		struct kup_ioc_info *ci = kmalloc(sizeof(*ci), GFP_KERNEL);

		poll_wait(file, &kf->poll_wq, wait);  /* for after an ATTACH */
		poll_wait(file, &od->poll_wq, wait);
		if (ci == NULL)
			return EPOLLERR;
		kup_core_info(kf->sc, ci);
		mutex_lock(&kf->lock);
		if (ci->notify_gen != kf->seen_gen)
			mask |= EPOLLIN | EPOLLRDNORM;
		mutex_unlock(&kf->lock);
		if (ci->shutting_down || kup_dev_is_gone(kf->sc))
			mask |= EPOLLIN | EPOLLRDNORM | EPOLLHUP;
		kfree(ci);
	}
	return mask;
}

/* read(2): consume pending wake-ups, like an eventfd.  Returns 8 bytes
 * (a uint64_t count, 1) or EAGAIN when nothing is pending; never blocks.
 * On a channel fd it consumes the channel's user wake-up; on an unattached
 * fd the device event (as KUP_IOC_INFO does). */
static ssize_t kup_fop_read(struct file *file, char __user *buf, size_t count,
    loff_t *ppos)
{
	struct kup_file *kf = file->private_data;
	struct kup_ioc_info *ci = NULL;
	struct kup_chan *ch;
	uint64_t v = 0, old_gen = 0, new_gen = 0;

	(void)ppos;
	if (count < sizeof(v))
		return -EINVAL;
	mutex_lock(&kf->lock);
	ch = kf->ch;   /* set once; stays until release, which cannot run now */
	if (ch != NULL) {
		v = atomic_xchg(&kup_core_chan_os(ch)->wake_pending, 0) ? 1 : 0;
	} else {
		ci = kmalloc(sizeof(*ci), GFP_KERNEL);
		if (ci == NULL) {
			mutex_unlock(&kf->lock);
			return -ENOMEM;
		}
		kup_core_info(kf->sc, ci);
		if (ci->notify_gen != kf->seen_gen) {
			old_gen = kf->seen_gen;
			new_gen = ci->notify_gen;
			kf->seen_gen = new_gen;
			v = 1;
		}
	}
	mutex_unlock(&kf->lock);
	kfree(ci);
	if (v == 0)
		return -EAGAIN;
	if (copy_to_user(buf, &v, sizeof(v))) {
		/* the caller never got it: the wake-up (or the device event)
		 * stays pending, so poll still says readable.  At worst one
		 * spurious wake-up, never a lost one. */
		if (ch != NULL)
			kup_os_chan_wake_user(ch);
		else
			kup_file_unsee_gen(kf, old_gen, new_gen);
		return -EFAULT;
	}
	return sizeof(v);
}

/* write(2) on a channel fd: make the user's own wake-up pending (libkup's
 * self_wake: poll mode started while the turn was already the user's).
 * Like an eventfd write: 8 bytes, a non-zero count.  It wakes only this
 * channel's pollers, never the kernel side (that is KUP_IOC_WAKE). */
static ssize_t kup_fop_write(struct file *file, const char __user *buf,
    size_t count, loff_t *ppos)
{
	struct kup_file *kf = file->private_data;
	struct kup_chan *ch;
	uint64_t v;

	(void)ppos;
	if (count < sizeof(v))
		return -EINVAL;
	if (copy_from_user(&v, buf, sizeof(v)))
		return -EFAULT;
	if (v == 0)
		return -EINVAL;
	mutex_lock(&kf->lock);
	ch = kf->ch;
	mutex_unlock(&kf->lock);
	if (ch == NULL)
		return -EINVAL;
	kup_os_chan_wake_user(ch);
	return sizeof(v);
}

static const struct file_operations kup_fops = {
	.owner          = THIS_MODULE,
	.open           = kup_fop_open,
	.release        = kup_fop_release,
	.read           = kup_fop_read,
	.write          = kup_fop_write,
	.unlocked_ioctl = kup_fop_ioctl,
	.compat_ioctl   = compat_ptr_ioctl,
	.mmap           = kup_fop_mmap,
	.poll           = kup_fop_poll,
};

/* ---- device node ------------------------------------------------------ */

/* devtmpfs (and udev, which reads the same DEVNAME) creates the node as
 * kup/<name>, root's, 0600: only root -- in practice kupd -- talks to the
 * kernel, everyone else goes through kupd's socket. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
static char *kup_devnode(const struct device *dev, umode_t *mode)
#else
static char *kup_devnode(struct device *dev, umode_t *mode)
#endif
{
	if (mode != NULL)
		*mode = 0600;
	return kasprintf(GFP_KERNEL, "kup/%s", dev_name(dev));
}

static struct class kup_class = {
	.name    = "kup",
	.devnode = kup_devnode,
};

/* the struct device's release: the last reference to the node is gone */
static void kup_node_free(struct device *dev)
{
	struct kup_node *node = container_of(dev, struct kup_node, dev);

	ida_free(&kup_minors, node->minor);
	kfree(node);
}

int kup_os_dev_publish(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);
	const char *name = kup_core_dev_name(sc);
	struct kup_node *node;
	int r;

	od->sc = sc;
	kup_os_dev_init_wq(od);
	strscpy(od->name, name, sizeof(od->name));
	node = kzalloc(sizeof(*node), GFP_KERNEL);
	if (node == NULL) {
		r = -ENOMEM;
		goto fail;
	}
	strscpy(node->name, name, sizeof(node->name));
	INIT_LIST_HEAD(&node->link);
	node->minor = ida_alloc_max(&kup_minors, KUP_MINORS - 1, GFP_KERNEL);
	if (node->minor < 0) {
		r = node->minor;
		pr_warn("kup: no free minor for /dev/kup/%s (%d devices at most): %d\n",
		    name, KUP_MINORS, r);
		goto fail_node;
	}
	/* from here on the struct device owns node: put_device frees it */
	device_initialize(&node->dev);
	node->dev.class = &kup_class;
	node->dev.devt = MKDEV(MAJOR(kup_devt), node->minor);
	node->dev.release = kup_node_free;
	r = dev_set_name(&node->dev, "%s", name);
	if (r != 0)
		goto fail_dev;
	cdev_init(&node->cdev, &kup_fops);
	node->cdev.owner = THIS_MODULE;
	/* An open can start as soon as the cdev is added: under the lock it
	 * waits until the node is either complete or known dead. */
	mutex_lock(&kup_nodes_lock);
	r = cdev_device_add(&node->cdev, &node->dev);
	if (r == 0) {
		node->sc = sc;
		list_add(&node->link, &kup_nodes);
	}
	mutex_unlock(&kup_nodes_lock);
	if (r != 0)
		goto fail_dev;
	od->registered = 1;
	return 0;

fail_dev:
	put_device(&node->dev);       /* kup_node_free: minor and memory */
	goto fail;
fail_node:
	kfree(node);
fail:
	pr_warn("kup: cannot register /dev/kup/%s: %d\n", name, r);
	return r;
}

/* Unpublish sc's node: no new opens (open sees node->sc == NULL), the node
 * leaves /dev and sysfs; open files keep the node's memory, not the minor's
 * mapping. */
static void kup_node_remove(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);
	struct kup_node *node = NULL, *it;

	if (!od->registered)
		return;
	mutex_lock(&kup_nodes_lock);
	list_for_each_entry(it, &kup_nodes, link) {
		if (it->sc == sc) {
			node = it;
			break;
		}
	}
	if (node != NULL) {
		list_del_init(&node->link);
		node->sc = NULL;
	}
	mutex_unlock(&kup_nodes_lock);
	od->registered = 0;
	if (node == NULL) {
		WARN_ONCE(1, "kup: device %s registered without a node\n", od->name);
		return;
	}
	cdev_device_del(&node->cdev, &node->dev);
	put_device(&node->dev);
}

void kup_os_dev_withdraw(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);

	WRITE_ONCE(od->withdrawn, 1);
	/* waits for an open in progress (kup_nodes_lock), not for users */
	kup_node_remove(sc);
	kup_os_dev_wake_user(sc);
}

void kup_os_dev_release(struct kupdev_softc *sc)
{
	/* withdraw may never have run (the device was never unloaded) */
	kup_node_remove(sc);
}

/* ---- the kernel API for other modules --------------------------------- */

EXPORT_SYMBOL_GPL(kupdev_create);
EXPORT_SYMBOL_GPL(kupdev_wait_channel);
EXPORT_SYMBOL_GPL(kupdev_wait_channel_timeout);
EXPORT_SYMBOL_GPL(kupdev_notify);
EXPORT_SYMBOL_GPL(kupdev_announce);
EXPORT_SYMBOL_GPL(kupdev_send);
EXPORT_SYMBOL_GPL(kupdev_receive);
EXPORT_SYMBOL_GPL(kupdev_receive_msg);
EXPORT_SYMBOL_GPL(kupdev_receive_any);
EXPORT_SYMBOL_GPL(kupdev_unlock_channel);
EXPORT_SYMBOL_GPL(kupdev_pass);
EXPORT_SYMBOL_GPL(kupdev_shutdown);
EXPORT_SYMBOL_GPL(kupdev_unload);
EXPORT_SYMBOL_GPL(kupdev_channel_count);
EXPORT_SYMBOL_GPL(kupdev_data_size);
EXPORT_SYMBOL_GPL(kupdev_channel_attached);
EXPORT_SYMBOL_GPL(kupdev_disconnect);
EXPORT_SYMBOL_GPL(kupdev_wake);
EXPORT_SYMBOL_GPL(kupdev_wake_channel);
EXPORT_SYMBOL_GPL(kupdev_wake_any);
EXPORT_SYMBOL_GPL(kup_ratelimit_admit);

static int __init kup_linux_init(void)
{
	int r;

	r = alloc_chrdev_region(&kup_devt, 0, KUP_MINORS, "kup");
	if (r != 0) {
		pr_err("kup: cannot allocate a character major: %d\n", r);
		goto fail;
	}
	r = class_register(&kup_class);
	if (r != 0) {
		pr_err("kup: cannot register the device class: %d\n", r);
		goto fail_region;
	}
	r = kup_core_init();
	if (r != 0) {
		pr_err("kup: core init failed: %d\n", r);
		goto fail_class;
	}
	pr_info("kup: loaded (ABI %u, major %u)\n", KUP_ABI_VERSION, MAJOR(kup_devt));
	return 0;

fail_class:
	class_unregister(&kup_class);
fail_region:
	unregister_chrdev_region(kup_devt, KUP_MINORS);
fail:
	return r;
}

/* Runs only once no file of ours is open (THIS_MODULE owns the fops) and
 * every client module is gone (they depend on our symbols): no device, no
 * node, no minor is left. */
static void __exit kup_linux_exit(void)
{
	kup_core_fini();
	class_unregister(&kup_class);
	unregister_chrdev_region(kup_devt, KUP_MINORS);
	ida_destroy(&kup_minors);
	pr_info("kup: unloaded\n");
}

module_init(kup_linux_init);
module_exit(kup_linux_exit);
