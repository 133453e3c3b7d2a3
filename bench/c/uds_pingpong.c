/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * uds_pingpong -- the syscall alternative: a unix-socket (SOCK_STREAM)
 * ping-pong between two processes, the same layout as the KUP floor
 * (this process <-> an echo process).  -d names the socket path to bind.
 *
 * Output: one round-trip time in ns per line (bench_common.h).  With -S it
 * only serves (the echo side for a client written in another language).
 */
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "bench_common.h"

static int
io_full(int fd, void *buf, size_t len, int writing)
{
	size_t done = 0;

	while (done < len) {
		ssize_t r = writing ? write(fd, (char *)buf + done, len - done)
		                    : read(fd, (char *)buf + done, len - done);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		done += (size_t)r;
	}
	return 0;
}

static int
echo_server(int lfd, size_t size)
{
	char *buf = malloc(size);
	int cfd = -1, rc = 1;

	if (buf == NULL)
		goto out;
	cfd = accept(lfd, NULL, NULL);
	if (cfd < 0) {
		perror("uds_pingpong: accept");
		goto out_buf;
	}
	for (;;) {
		if (io_full(cfd, buf, size, 0) != 0)
			break; /* peer closed: done */
		if (io_full(cfd, buf, size, 1) != 0) {
			perror("uds_pingpong: echo write");
			goto out_fd;
		}
	}
	rc = 0;
out_fd:
	close(cfd);
out_buf:
	free(buf);
out:
	return rc;
}

int
main(int argc, char **argv)
{
	struct bench_opts o;
	struct sockaddr_un sa;
	char *out = NULL, *in = NULL;
	uint64_t *ns = NULL;
	int lfd = -1, fd = -1, rc = 1, status = 0;
	pid_t child = -1;
	long i;

	if (bench_parse(argc, argv, &o) != 0)
		return 2;
	if (o.idle_ms != 0) {
		fprintf(stderr, "uds_pingpong: -i (arrival mode) is kup_floor's only\n");
		return 2;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(o.target) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "uds_pingpong: socket path too long: %s\n", o.target);
		return 2;
	}
	strcpy(sa.sun_path, o.target);

	out = malloc((size_t)o.size);
	in = malloc((size_t)o.size);
	ns = calloc((size_t)o.n, sizeof(*ns));
	if (out == NULL || in == NULL || ns == NULL) {
		fprintf(stderr, "uds_pingpong: out of memory\n");
		goto out_mem;
	}
	memset(out, 0xa5, (size_t)o.size);

	lfd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lfd < 0) {
		perror("uds_pingpong: socket");
		goto out_mem;
	}
	unlink(o.target);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(lfd, 1) != 0) {
		perror("uds_pingpong: bind/listen");
		goto out_lfd;
	}
	if (o.serve) {
		/* Server for a client in another program (the Python baseline). */
		printf("ready\n");
		fflush(stdout);
		rc = echo_server(lfd, (size_t)o.size);
		goto out_unlink;
	}
	child = fork();
	if (child < 0) {
		perror("uds_pingpong: fork");
		goto out_unlink;
	}
	if (child == 0)
		_exit(echo_server(lfd, (size_t)o.size));

	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		perror("uds_pingpong: connect");
		goto out_child;
	}
	for (i = -o.warmup; i < o.n; i++) {
		uint64_t t0 = bench_now_ns();

		if (io_full(fd, out, (size_t)o.size, 1) != 0 ||
		    io_full(fd, in, (size_t)o.size, 0) != 0) {
			fprintf(stderr, "uds_pingpong: round trip %ld failed\n", i);
			goto out_child;
		}
		if (i >= 0)
			ns[i] = bench_now_ns() - t0;
		if (memcmp(in, out, (size_t)o.size) != 0) {
			fprintf(stderr, "uds_pingpong: echo mismatch at %ld\n", i);
			goto out_child;
		}
	}
	rc = 0;
out_child:
	if (fd >= 0)
		close(fd);
	fd = -1;
	if (rc != 0)
		kill(child, SIGTERM);
	if (waitpid(child, &status, 0) == child &&
	    (!WIFEXITED(status) || WEXITSTATUS(status) != 0) && rc == 0) {
		fprintf(stderr, "uds_pingpong: echo process failed\n");
		rc = 1;
	}
out_unlink:
	unlink(o.target);
out_lfd:
	close(lfd);
out_mem:
	if (rc == 0 && !o.serve && bench_print(ns, o.n) != 0)
		rc = 1;
	free(ns);
	free(in);
	free(out);
	return rc;
}
