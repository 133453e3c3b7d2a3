/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_client.c -- a minimal libkup client: the seed's user-side API used
 * the way a C program would use it.  Used by `make demo` (kupd/demo.py).
 *
 *   kup_client [-c CHAN] [-t TIMEOUT_MS] [--] DEVICE MESSAGE...
 *
 * Options are read with getopt(3): a MESSAGE (or DEVICE) that starts with
 * '-', such as "-2", needs "--" before it -- glibc's getopt takes an
 * argument that looks like an option wherever it is, even after DEVICE.
 *
 * Opens DEVICE (a name, or a path containing '/'), attaches channel CHAN
 * (default: any free one), takes the kernel's opening hand-over, then for
 * every MESSAGE sends it and prints the reply.  One line per event on
 * stdout:
 *     attached <device> channel <id> max_msg <n>
 *     recv <KIND> seq <n> len <n> "<printable payload>"
 *     send seq? len <n> "<payload>"
 * Exit status 0 on success, 1 on a libkup error (named on stderr), 2 on
 * bad usage.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kup.h"

static const char *
kind_name(uint32_t kind)
{
	switch (kind) {
	case KUP_KIND_DATA:  return "DATA";
	case KUP_KIND_PASS:  return "PASS";
	case KUP_KIND_CLOSE: return "CLOSE";
	default:             return "?";
	}
}

static void
print_payload(const void *data, size_t len)
{
	const unsigned char *p = data;
	size_t i, shown = len < 200 ? len : 200;

	putchar('"');
	for (i = 0; i < shown; i++) {
		if (p[i] == '"' || p[i] == '\\')
			printf("\\%c", p[i]);
		else if (p[i] >= 0x20 && p[i] < 0x7f)
			putchar(p[i]);
		else
			printf("\\x%02x", p[i]);
	}
	putchar('"');
	if (shown < len)
		printf("...(+%zu byte%s)", len - shown,
		    len - shown == 1 ? "" : "s");
}

static int
fail(const char *what, int code)
{
	if (code == EKU_SYS)
		fprintf(stderr, "kup_client: %s: %s (%s)\n", what, kernproxy_strerror(code),
		    strerror(errno));
	else
		fprintf(stderr, "kup_client: %s: %s\n", what, kernproxy_strerror(code));
	return 1;
}

static int
parse_long(const char *s, long min, long max, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

static int
receive_one(void *chan, int timeout_ms)
{
	struct kernproxy_msg m;

	if (kernproxy_receive_msg(chan, &m, timeout_ms) != 0)
		return fail("receive", kernproxy_errno);
	printf("recv %s seq %llu len %zu ", kind_name(m.kind), (unsigned long long)m.seq, m.len);
	print_payload(m.data, m.len);
	putchar('\n');
	fflush(stdout);
	return 0;
}

int
main(int argc, char **argv)
{
	long chan = -1, timeout_ms = 5000;
	void *dev = NULL, *ch = NULL;
	int opt, i, rc = 1;

	while ((opt = getopt(argc, argv, "c:t:")) != -1) {
		switch (opt) {
		case 'c':
			if (parse_long(optarg, 0, KUP_MAX_CHANNELS - 1, &chan) != 0) {
				fprintf(stderr, "kup_client: -c %s: channel must be 0..%u\n", optarg,
				    KUP_MAX_CHANNELS - 1);
				return 2;
			}
			break;
		case 't':
			if (parse_long(optarg, -1, 3600000, &timeout_ms) != 0) {
				fprintf(stderr, "kup_client: -t %s: timeout must be -1..3600000 ms\n",
				    optarg);
				return 2;
			}
			break;
		default:
			goto usage;
		}
	}
	if (optind >= argc)
		goto usage;

	dev = kernproxy_open(argv[optind]);
	if (dev == NULL) {
		rc = fail(argv[optind], kernproxy_errno);
		goto out;
	}
	ch = kernproxy_channel(dev, chan < 0 ? KP_CHAN_ANY : (size_t)chan, 0);
	if (ch == NULL) {
		int code = kernproxy_errno;
		struct kernproxy_info *info;

		/* a channel id past the device's: say which ids there are */
		info = code == KUP_E_NOENT && chan >= 0 ? calloc(1, sizeof(*info)) : NULL;
		if (info != NULL && kernproxy_info(dev, info) == 0 &&
		    (uint32_t)chan >= info->chan_count) {
			fprintf(stderr, "kup_client: attach: %s has no channel %ld "
			    "(it has %u: 0..%u)\n", argv[optind], chan,
			    info->chan_count, info->chan_count - 1);
			rc = 1;
		} else
			rc = fail("attach", code);
		free(info);
		goto out_dev;
	}
	printf("attached %s channel %u max_msg %zu\n", argv[optind], kernproxy_chan_id(ch),
	    kernproxy_max_msg(ch));
	/* A fresh channel: the kernel holds the turn and speaks first. */
	if (receive_one(ch, (int)timeout_ms) != 0)
		goto out_chan;
	for (i = optind + 1; i < argc; i++) {
		size_t len = strlen(argv[i]);

		if (kernproxy_send(ch, argv[i], len, 0) != 0) {
			rc = fail("send", kernproxy_errno);
			goto out_chan;
		}
		printf("send len %zu ", len);
		print_payload(argv[i], len);
		putchar('\n');
		if (receive_one(ch, (int)timeout_ms) != 0)
			goto out_chan;
	}
	rc = 0;
out_chan:
	kernproxy_close(ch);
out_dev:
	kernproxy_close(dev);
out:
	fflush(stdout);
	return rc;
usage:
	fprintf(stderr, "usage: kup_client [-c CHAN] [-t TIMEOUT_MS] [--] DEVICE MESSAGE...\n"
	    "  a MESSAGE that starts with '-' (\"-2\") needs \"--\" before it: "
	    "kup_client echo -- -2\n");
	return 2;
}
