#!/bin/sh
# Runs INSIDE the test VM (scripts/vm/init chroots into the host tree and
# runs the job that tests/vm/test_vm.py writes, which execs this script).
# Environment: REPO (the repo root), KMODDIR (kup.ko, kup_echo.ko),
# TESTKMODDIR (kup_holdtest.ko, built by test_vm.py), BINDIR
# (host-built test programs), KVER (the kernel release the VM was meant to
# boot and KMODDIR was built for; test_vm.py runs one VM per kernel).  Prints "=== STAGE <name>" before and
# "=== RESULT <name> <rc>" after every stage; test_vm.py turns each stage
# into a pytest test.  Stages run in order; unload is last.
set -u
REPO=${REPO:?}; KMODDIR=${KMODDIR:?}; BINDIR=${BINDIR:?}
PY=$REPO/.venv/bin/python
export KUP_BACKEND=linux
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=23
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=24
SELF=$(readlink -f "$0")
STAGE_TIMEOUT=${STAGE_TIMEOUT:-300}
STAGES=${STAGES:-"load devnode kfault_basic kfault_mmap kfault_sigkill kfault_hostile kfault_release kfault_abuse kfault_siege kfault_reload kfault_compat kmutex kholder libkup_c receive_any anyherd python_channel kupd unload dmesg"}

stage() {  # stage NAME: run stage_NAME, report its status
	echo "=== STAGE $1"
	t0=$(cut -d' ' -f1 /proc/uptime)
	# each stage in its own shell with a bound, so one hang cannot eat the
	# whole run: 124 = the stage timed out
	timeout -k 10 "$STAGE_TIMEOUT" sh "$SELF" --stage "$1" 2>&1
	rc=$?
	[ $rc -eq 124 ] && echo "stage $1 timed out after ${STAGE_TIMEOUT}s"
	echo "stage $1 took $(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN{printf "%.1f", b-a}')s"
	echo "=== RESULT $1 $rc"
	[ $rc -eq 0 ] || FAILED="$FAILED $1"
}

wait_dev() {  # wait_dev NAME: bounded wait for /dev/kup/NAME
	i=0
	while [ ! -c "/dev/kup/$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
	[ -c "/dev/kup/$1" ] || { echo "/dev/kup/$1 did not appear"; return 1; }
}

wait_for() {  # wait_for TEXT FILE PID: bounded wait for a marker line
	i=0
	while ! grep -q "$1" "$2" && [ $i -lt 600 ]; do
		kill -0 "$3" 2>/dev/null || break
		sleep 0.1; i=$((i+1))
	done
	grep -q "$1" "$2" || { cat "$2"; echo "never saw '$1'"; return 1; }
}

kup_major() {  # kup_major: the "kup" character major from /proc/devices
	awk '/^Character devices:/ { c = 1; next } /^Block devices:/ { c = 0 }
	     c && $2 == "kup" { print $1 }' /proc/devices
}

# check_kup_major NAME...: kup.ko has a character major of its own (what
# kupd.service's DeviceAllow=char-kup resolves), each /dev/kup/NAME is a
# character device of it, root's and 0600, and none is a misc device any
# more (char-misc would allow /dev/kvm, /dev/fuse, ... as well)
check_kup_major() {
	major=$(kup_major)
	echo "/proc/devices: kup is character major '${major}'"
	case $major in
	''|*[!0-9]*) echo "/proc/devices lists no single 'kup' character major"; grep -n . /proc/devices; return 1 ;;
	esac
	[ "$major" != 10 ] || { echo "kup got the misc major"; return 1; }
	for n in "$@"; do
		f=/dev/kup/$n
		[ -c "$f" ] || { echo "$f is not a character device"; return 1; }
		read -r hmaj hmin mode uid gid <<-EOF
		$(stat -L -c '%t %T %a %u %g' "$f")
		EOF
		maj=$(printf '%d' "0x$hmaj"); min=$(printf '%d' "0x$hmin")
		echo "$f: $maj:$min mode $mode uid $uid gid $gid"
		[ "$maj" = "$major" ] || { echo "$f has major $maj, not kup's $major"; return 1; }
		[ "$mode $uid $gid" = "600 0 0" ] || { echo "$f must be 0600 root:root"; return 1; }
		# the class device behind it: /sys/class/kup/NAME, same numbers
		[ "$(cat "/sys/class/kup/$n/dev")" = "$maj:$min" ] \
			|| { echo "/sys/class/kup/$n/dev disagrees with $f"; return 1; }
	done
	if grep -E ' kup-' /proc/misc; then
		echo "a KUP device is still registered as a misc device"
		return 1
	fi
}

stage_load() {
	# the VM runs the kernel the modules were built for (test_vm.py boots
	# one VM per kernel series, each with its own build of the modules)
	echo "kernel $(uname -r); kup.ko vermagic: $(modinfo -F vermagic "$KMODDIR/kup.ko")"
	if [ -n "${KVER:-}" ] && [ "$(uname -r)" != "$KVER" ]; then
		echo "the VM booted $(uname -r), not $KVER"; return 1
	fi
	# kup.ko's params reach the modules' kup_os_param_int()
	insmod "$KMODDIR/kup.ko" params="echo.channels=128,rot13.channels=64"
	insmod "$KMODDIR/kup_echo.ko"
	insmod "$KMODDIR/kup_rot13.ko"
	wait_dev echo
	wait_dev rot13
	ls -l /dev/kup/
	grep -E '^kup(_echo|_rot13)? ' /proc/modules
	n=$("$BINDIR/kup_kfault" chans rot13)
	[ "$n" = 64 ] || { echo "rot13.channels=64 did not reach the module ($n channels)"; return 1; }
	n=$("$BINDIR/kup_kfault" chans echo)
	[ "$n" = 128 ] || { echo "echo.channels=128 did not reach the module ($n channels)"; return 1; }
}

stage_devnode() { check_kup_major echo rot13; }

stage_kfault_basic()   { "$BINDIR/kup_kfault" basic; }
stage_kfault_mmap()    { "$BINDIR/kup_kfault" mmap; }
stage_kfault_sigkill() {
	"$BINDIR/kup_kfault" sigkill
	dmesg | grep -q 'echo: chan 24: peer gone (-EPIPE)' \
		|| { echo "kernel waiter did not see -EPIPE"; dmesg | tail -20; return 1; }
}
stage_kfault_hostile() {
	"$BINDIR/kup_kfault" hostile
	n=$(dmesg | grep -c 'protocol error from user' || true)
	echo "kernel refused $n hostile hand-overs"
	[ "$n" -ge 7 ]
}

stage_kfault_release() { "$BINDIR/kup_kfault" release; }

# a hostile user's other tools (kup_kfault.c, "abuse"): bad buffers,
# ATTACH races on one fd, the fd and mapping handed on by fork and
# SCM_RIGHTS, madvise/mremap/munmap/process_vm_readv on the mapping,
# wake-up storms, a descriptor flipped while the kernel reads it, close
# during poll; the dmesg stage checks that none of it made the kernel warn
stage_kfault_abuse() { "$BINDIR/kup_kfault" abuse; }

# more of them (kup_kfault.c, "siege"): close(2) racing ATTACH/mmap/INFO/
# poll on one fd, the mapping as the buffer of other system calls (pipes,
# the fd's own read/write/ioctls, futexes, process_vm_writev, an io_uring
# fixed buffer, userfaultfd), the rarer mm calls on it (a one-page window
# forked and mremap'd, remap_file_pages, MAP_FIXED, madvise/mlock/msync/
# mincore), a user the module disconnected that goes on handing over and
# leaves its mapping to a child, a signal storm at an ATTACH pausing for a
# channel its module holds, and eight processes taking every channel and
# being SIGKILLed at once; dmesg must stay clean
stage_kfault_siege() { "$BINDIR/kup_kfault" siege; }

# opens racing the node's withdrawal and publication: kup_kfault
# reload-race's threads open /dev/kup/echo, ask INFO, attach any channel,
# map it and talk, while kup_echo.ko is unloaded and loaded five times
# under them; every answer must be one the ABI names, dmesg stay clean
stage_kfault_reload() {
	d=$(mktemp -d)
	"$BINDIR/kup_kfault" reload-race "$d" > "$d/out" 2>&1 &
	pid=$!
	i=0
	while [ ! -f "$d/running" ] && [ $i -lt 600 ]; do
		kill -0 $pid 2>/dev/null || break
		sleep 0.1; i=$((i+1))
	done
	[ -f "$d/running" ] || { cat "$d/out"; echo "reload-race never ran"; return 1; }
	for n in 1 2 3 4 5; do
		sleep 0.5       # let the users get going on this load
		rmmod kup_echo
		insmod "$KMODDIR/kup_echo.ko"
		wait_dev echo
	done
	sleep 0.5
	touch "$d/stop"
	rc=0; wait $pid || rc=$?
	cat "$d/out"
	[ $rc -eq 0 ] || { echo "reload-race failed ($rc)"; return 1; }
}

# a 32-bit (i386) process on the device (tests/vm/kup_compat32.c): INFO,
# ATTACH and bad pointers through kup.ko's compat_ioctl, the channel
# through mmap2, one round trip
stage_kfault_compat() { "$BINDIR/kup_compat32"; }

# kup.ko's kup_mutex when its holder thread exits holding it (a module bug):
# kup_holdtest.ko test=mutex (tests/vm/kup_holdtest.c) makes threads that
# may run in the dead holder's task_struct memory unlock it; every unlock
# must be refused and the final free must find it still locked.  (It used
# to keep a bare task pointer: a thread in the reused memory passed for the
# holder.)
stage_kmutex() {
	insmod "${TESTKMODDIR:?}/kup_holdtest.ko" test=mutex
	rmmod kup_holdtest
	dmesg | grep 'kup_holdtest: mutex:'
	line=$(dmesg | grep 'kup_holdtest: mutex: .* unlocks by other threads' | tail -1)
	n=$(echo "$line" | sed -E 's/.*kup_holdtest: mutex: ([0-9]+) unlocks.*/\1/')
	case $n in
	''|*[!0-9]*|0) echo "kup_holdtest did not report"; return 1 ;;
	esac
	refused=$(dmesg | grep -c 'kup: mutex kup-holdtest: unlock: not held by this thread' || true)
	echo "kup_holdtest: $refused of $n unlocks refused"
	[ "$refused" -eq "$n" ] || { echo "an unlock by a thread that did not hold the mutex released it"; return 1; }
	dmesg | grep -q 'kup: mutex kup-holdtest: free: still locked' \
		|| { echo "the dead holder's mutex was not locked any more at the free"; return 1; }
}

# The same for a channel: kup_holdtest.ko test=channel makes device
# "holdtest", whose holder threads each receive a message of its user
# (kup_kfault deadholder) and exit without kupdev_unlock_channel.  kup.ko
# pins a holder's task_struct while ch->holder names it, so the module's
# other threads -- some of them, unpinned, in the dead holder's memory --
# are strangers to channel 0: -EBUSY from receive and send, never
# -EDEADLK (taken for the holder re-entering), and their unlock refused
# (the hold stays: the user sees it in INFO, and a new user cannot attach
# the channel).  Channel 1's holder shows the pin in the module's count of
# references to its task_struct: 2 (the module's own and the pin) while
# the channel names it and 1 once the unload freed the device: not
# leaked.  insmod returns once the module's threads are done.
stage_kholder() {
	d=$(mktemp -d)
	"$BINDIR/kup_kfault" deadholder "$d" > "$d/out" 2>&1 &
	pid=$!
	insmod "${TESTKMODDIR:?}/kup_holdtest.ko" test=channel \
		|| { cat "$d/out"; dmesg | grep 'kup_holdtest:'; return 1; }
	touch "$d/go"
	rc=0; wait $pid || rc=$?
	cat "$d/out"
	[ $rc -eq 0 ] || { dmesg | grep 'kup_holdtest: channel:'; echo "the user of the held channel failed ($rc)"; return 1; }
	rmmod kup_holdtest
	dmesg | grep -E 'kup_holdtest: channel:|kup: holdtest:'
	dmesg | grep -q 'kup_holdtest: channel: holder task_struct references once it exited: 2 ' \
		|| { echo "the exited holder's task_struct is not pinned (want 2 references)"; return 1; }
	line=$(dmesg | grep 'kup_holdtest: channel: .* other threads' | tail -1)
	n=$(echo "$line" | sed -E 's/.*kup_holdtest: channel: ([0-9]+) other threads.*/\1/')
	case $n in
	''|*[!0-9]*|0) echo "kup_holdtest did not report its other threads"; return 1 ;;
	esac
	echo "$line" | grep -q ' 0 answered wrong' \
		|| { echo "a thread that never received on the channel was taken for its dead holder"; return 1; }
	for ch in 0 1; do
		dmesg | grep -q "kup: holdtest: chan $ch: still held by a module thread at unload" \
			|| { echo "the unload did not name channel $ch, which a dead holder held"; return 1; }
	done
	dmesg | grep -q 'kup_holdtest: channel: holder task_struct references after unload: 1 ' \
		|| { echo "the dead holder's task_struct stayed pinned after its device was freed (leaked)"; return 1; }
}

# libkup's C scenarios (tests/c/test_kup.c, the same program the kupsim
# tests run) against the real module, KUP_BACKEND=linux; the driver's part
# (kill a holder, unload the module) is done here instead of on kupsim.
stage_libkup_c() {
	T=$BINDIR/test_kup
	for s in blocking nonblocking transforms many threads sizes version idle churn stress; do
		"$T" $s
	done
	# a hand-over whose KUP_IOC_WAKE fails (made to fail in the kernel's
	# ioctl by a seccomp filter of test_kup's): the wake-up is owed and
	# made by the next call; echo, which waits without a bound, answers
	# every message once
	out=$(mktemp)
	"$T" wakefail > "$out" 2>&1 || { cat "$out"; return 1; }
	cat "$out"
	grep -q "OK wakefail (kernel device: KUP_IOC_WAKE failed in the kernel)" "$out"
	# twodev opens "$KUPSIM_DIR/rot13.sock" as a path: here a symlink to
	# the real device node (a path naming a character device is ours)
	kd=$(mktemp -d)
	ln -s /dev/kup/rot13 "$kd/rot13.sock"
	KUPSIM_DIR=$kd "$T" twodev
	ch=80
	for v in seqrep seqgap badlen badlen1 badkind badturn; do
		"$T" hostile_user $v $ch
		ch=$((ch + 2))
	done
	# a holder SIGKILLed while attached: the channel comes back
	out=$(mktemp)
	"$T" hold 91 > "$out" 2>&1 &
	pid=$!
	wait_for "ATTACHED 91" "$out" $pid
	kill -9 $pid; wait $pid || true
	"$T" reattach 91
	# unload while a receiver is blocked: it sees EKU_SHUTDOWN
	"$T" shutdown_wait > "$out" 2>&1 &
	pid=$!
	wait_for "WAITING" "$out" $pid
	rmmod kup_echo
	rc=0; wait $pid || rc=$?
	cat "$out"
	[ $rc -eq 0 ]
	grep -q "OK shutdown_wait" "$out"
	insmod "$KMODDIR/kup_echo.ko"
	wait_dev echo
	# the module answers, then unloads before the user has read the
	# answer: it is still read, then EKU_SHUTDOWN
	"$T" shutdown_unread > "$out" 2>&1 &
	pid=$!
	wait_for "READY" "$out" $pid
	rmmod kup_echo
	rc=0; wait $pid || rc=$?
	cat "$out"
	[ $rc -eq 0 ]
	grep -q "OK shutdown_unread" "$out"
	insmod "$KMODDIR/kup_echo.ko"    # the later stages need it back
	wait_dev echo
}

# kupdev_receive_any on the real kernel: echo reloaded in its "any" mode
# (kup.params echo.any=1), where one module thread serves every channel;
# libkup users hand over on 32 channels at once and one at a time (the
# user's KUP_IOC_WAKE must reach the thread asleep on the device's
# receive_any queue), then echo goes back to its workers.
stage_receive_any() {
	P=/sys/module/kup/parameters/params
	old=$(cat "$P")
	n0=$(dmesg | wc -l)
	rmmod kup_echo
	echo "$old,echo.any=1" > "$P"
	insmod "$KMODDIR/kup_echo.ko"
	wait_dev echo
	rc=0
	"$BINDIR/test_kup" anystress || rc=$?
	log=$(dmesg | tail -n +$((n0 + 1)))
	# echo with its workers again for the later stages, whatever happened
	rmmod kup_echo           # the server thread joins at unload
	echo "$old" > "$P"
	insmod "$KMODDIR/kup_echo.ko"
	wait_dev echo
	echo "$log" | grep -q 'echo: device echo ready (128 channels, 1 pages, one receive_any thread)' \
		|| { echo "echo did not start in its any mode"; echo "$log" | tail -5; return 1; }
	[ $rc -eq 0 ] || { echo "test_kup anystress failed ($rc)"; return 1; }
	if echo "$log" | grep -E 'echo: chan [0-9]+: (receive failed|reply failed|first pass failed)'; then
		echo "the receive_any server failed a call"
		return 1
	fi
	echo "$log" | grep -q 'echo: device echo unloaded' \
		|| { echo "echo in its any mode did not unload"; return 1; }
}

# Threads in kupdev_receive_any on disjoint sets (kup_anyherd.ko,
# tests/vm/kup_anyherd.c): a user talks to one of them only, each message
# handed over while it sleeps; every other thread must have been woken
# zero times (the core's count of its wake-ups that found nothing: no
# thundering herd on the device's channel wake-ups).
stage_anyherd() {
	n0=$(dmesg | wc -l)
	insmod "${TESTKMODDIR:?}/kup_anyherd.ko"
	rc=0
	"$BINDIR/kup_kfault" anyherd || rc=$?
	rmmod kup_anyherd
	log=$(dmesg | tail -n +$((n0 + 1)) | grep 'kup_anyherd:')
	echo "$log"
	[ $rc -eq 0 ] || { echo "kup_kfault anyherd failed ($rc)"; return 1; }
	echo "$log" | grep -q 'kup_anyherd: thread 0: served 24, ' \
		|| { echo "thread 0 did not serve the 24 messages"; return 1; }
	for t in 1 2 3; do
		echo "$log" | grep -q "kup_anyherd: thread $t: served 0, idle wake-ups 0, " \
			|| { echo "thread $t was woken for another thread's channels"; return 1; }
	done
}

stage_python_channel() {
	cd "$REPO"
	"$PY" -m pytest -q -p no:cacheprovider -p no:hypothesispytest -o addopts="" \
		--durations=3 tests/vm/guest_channel.py
	lsmod | grep -q '^kup_rot13 '   # the unload scenario reloaded it
}

# kupd serves echo, rot13 and kmod/examples/tally (kup_tally.ko, its
# default 4 channels), which guest_kupd.py unloads at its end
stage_kupd() {
	n0=$(dmesg | wc -l)
	insmod "$KMODDIR/kup_tally.ko"
	wait_dev tally
	cd "$REPO"
	rc=0
	"$PY" tests/vm/guest_kupd.py || rc=$?
	if grep -q '^kup_tally ' /proc/modules; then rmmod kup_tally; fi
	log=$(dmesg | tail -n +$((n0 + 1)) | grep 'tally:' || true)
	echo "$log"
	[ $rc -eq 0 ] || return 1
	echo "$log" | grep -q 'tally: device tally ready (4 channels)' \
		|| { echo "kup_tally did not start with its 4 channels"; return 1; }
	echo "$log" | grep -q 'tally: device tally unloaded' \
		|| { echo "kup_tally did not unload"; return 1; }
}

stage_unload() {
	d=$(mktemp -d)
	"$BINDIR/kup_kfault" unload-hold "$d" > "$d/out" 2>&1 &
	pid=$!
	i=0
	while [ ! -f "$d/attached" ] && [ $i -lt 300 ]; do
		kill -0 $pid 2>/dev/null || break
		sleep 0.1; i=$((i+1))
	done
	[ -f "$d/attached" ] || { cat "$d/out"; echo "holder never attached"; return 1; }
	# and traffic in full flow on four more channels while the module goes
	tpids=""
	for ch in 40 41 42 43; do
		"$BINDIR/kup_kfault" traffic "$d" $ch > "$d/traffic-$ch" 2>&1 &
		tpids="$tpids $!"
	done
	for ch in 40 41 42 43; do
		i=0
		while [ ! -f "$d/running-$ch" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
		[ -f "$d/running-$ch" ] || { cat "$d/traffic-$ch"; echo "no traffic on $ch"; return 1; }
	done
	# and users blocked in every other kind of wait (kup_kfault.c,
	# unload-waiters): poll and epoll, an ATTACH pausing for a channel
	# its module holds, every other call in a loop; each must end by itself
	"$BINDIR/kup_kfault" unload-waiters "$d" > "$d/waiters" 2>&1 &
	wpid=$!
	i=0
	while [ ! -f "$d/waiting" ] && [ $i -lt 600 ]; do
		kill -0 $wpid 2>/dev/null || break
		sleep 0.1; i=$((i+1))
	done
	[ -f "$d/waiting" ] || { cat "$d/waiters"; echo "the waiters never got in place"; return 1; }
	# a node of echo's numbers outside devtmpfs, held open on fd 3: its
	# inode keeps pointing at the cdev after the device is gone
	stale=$d/stale-echo
	stale_min=$(printf '%d' "0x$(stat -L -c '%T' /dev/kup/echo)")
	mknod "$stale" c "$(kup_major)" "$stale_min"
	exec 3< "$stale"
	rmmod kup_rot13
	rmmod kup_echo          # must succeed while user space is attached
	echo "kup_echo unloaded while attached"
	# its node left /dev and sysfs at once, open files or not
	for p in /dev/kup/echo /dev/kup/rot13 /sys/class/kup/echo /sys/class/kup/rot13; do
		[ ! -e "$p" ] || { echo "$p outlived its module"; return 1; }
	done
	i=0
	while ! grep -q 'saw shutdown' "$d/out" && [ $i -lt 300 ]; do
		kill -0 $pid 2>/dev/null || break
		sleep 0.1; i=$((i+1))
	done
	grep -q 'saw shutdown' "$d/out" || { cat "$d/out"; echo "holder never saw shutdown"; return 1; }
	for p in $tpids; do
		rc=0; wait "$p" || rc=$?
		[ $rc -eq 0 ] || { cat "$d"/traffic-*; echo "a traffic process failed ($rc)"; return 1; }
	done
	cat "$d"/traffic-*
	rc=0; wait $wpid || rc=$?
	cat "$d/waiters"
	[ $rc -eq 0 ] || { echo "a waiter did not end well across the unload ($rc)"; return 1; }
	# No new open reaches the unloaded device, not even through an inode
	# that still holds its cdev, and not even once a new device of the same
	# name exists (it gets another minor: the old one lives while fd 3 does)
	if (exec 4< "$stale") 2>/dev/null; then
		echo "$stale opened after kup_echo was unloaded"
		return 1
	fi
	insmod "$KMODDIR/kup_echo.ko"
	wait_dev echo
	new_min=$(printf '%d' "0x$(stat -L -c '%T' /dev/kup/echo)")
	[ "$new_min" != "$stale_min" ] || { echo "the reloaded echo reuses minor $stale_min"; return 1; }
	if (exec 4< "$stale") 2>/dev/null; then
		echo "$stale (minor $stale_min) opened the reloaded echo (minor $new_min)"
		return 1
	fi
	"$BINDIR/kup_kfault" chans echo > /dev/null   # the new node works
	rmmod kup_echo
	exec 3<&-
	echo "a stale node of an unloaded device does not open, before or after a reload: ok"
	if rmmod kup 2>/dev/null; then
		echo "kup.ko unloaded while a mapping of its device was alive"
		return 1
	fi
	echo "kup.ko refused to unload while mapped: ok"
	touch "$d/go"
	rc=0; wait $pid || rc=$?
	cat "$d/out"
	[ $rc -eq 0 ]
	rmmod kup
	echo "kup.ko unloaded after the last mapping went away"
	if grep -E '^kup ' /proc/modules; then echo "kup.ko still listed"; return 1; fi
	# and gave back its major and class
	[ -z "$(kup_major)" ] || { echo "/proc/devices still lists kup"; return 1; }
	[ ! -e /sys/class/kup ] || { echo "/sys/class/kup outlived kup.ko"; return 1; }
}

stage_dmesg() {
	if dmesg | grep -E 'WARNING:|BUG:|Oops|Call Trace|general protection|KASAN|UBSAN|refcount_t:|list_(add|del) corruption|INFO: task .* blocked'; then
		echo "kernel log shows problems"
		return 1
	fi
	echo "kernel log clean"
}

if [ "${1:-}" = "--stage" ]; then
	set -e
	"stage_$2"
	exit 0
fi

FAILED=""
for s in $STAGES; do
	stage "$s"
done
if [ -n "$FAILED" ]; then
	echo "failed stages:$FAILED"
	exit 1
fi
echo "all stages passed"
