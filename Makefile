# kupd -- top-level entry points.  Every target sets itself up: system
# packages (scripts/setup-apt.sh) and the Python virtualenv (.venv) are
# installed idempotently on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .stamp

.PHONY: all apt setup build native python test demo lint bench vm-test kmod-freebsd-check clean load-test client-dist cpp-client

all: build

$(STAMP):
	mkdir -p $(STAMP)

# Runs every time (no stamp): it is idempotent and takes ~0.1 s when all is
# there, and what it provides is not all in dpkg's database -- the 6.12
# kernel the VM test boots is unpacked into .cache/kernels, which a
# `git clean` or a deleted cache removes behind a stamp's back.
apt:
	bash scripts/setup-apt.sh

# Both distributions, editable: kupclient (clients/python: kupclient, kupctl,
# kupapi) first, then kupd, which requires it.
$(STAMP)/venv: pyproject.toml clients/python/pyproject.toml | $(STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# a kupd installed before kupclient had its own distribution owned
	# kupclient's files (bin/kupctl): reinstalling it after kupclient would
	# take them away, so it goes first
	$(PY) -m pip uninstall -q -y kupd 2>/dev/null || true
	$(PY) -m pip install -q -e ./clients/python
	$(PY) -m pip install -q -e '.[dev]'
	# setuptools' editable install finds kupd, kupclient and kupapi with an import
	# hook, which mypy cannot follow: a program type-checked against this
	# venv (mypy --python-executable .venv/bin/python) saw none.  Plain
	# path entries, as a compat-mode install would write, let it.
	$(PY) -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "kupd-typing-paths.pth").write_text("$(CURDIR)\n$(CURDIR)/clients/python\n")'
	touch $@

setup: apt $(STAMP)/venv

# Native parts: the core, kupsim, libkup, example modules (kmod/Makefile).
native: setup
	$(MAKE) -C kmod

# Python parts that need building: the C extension and generated gRPC stubs.
python: setup native
	$(PY) setup.py -q build_ext --inplace
	$(MAKE) -s proto
	# byte-compile the tree's own modules (after proto: the stubs too).  An
	# environment with PYTHONDONTWRITEBYTECODE set (as CI's may be) writes no
	# __pycache__ on import, and every kupd, kupctl or Python child a test
	# starts -- a thousand and more in `make test`, some in TCG guests -- then
	# compiled kupd and kupclient from source again: ~0.15 s of CPU each.
	# Only a cache: a stale .pyc is ignored (its source is newer).
	$(PY) -m compileall -q -j 0 kupd clients/python bench scripts tests >/dev/null

proto: setup
	@if [ -f scripts/gen-proto.sh ]; then bash scripts/gen-proto.sh $(PY); fi

build: native python

# The client's distribution (clients/python/pyproject.toml): a kupclient
# wheel in dist/ -- kupclient, kupctl and kupapi (the kup.v1 stubs, the
# error taxonomy and the rest of the API kupd shares with its clients), with
# only the client's dependencies (no C extension, no structlog).  `pip
# install ./clients/python` is the same.  kupd's own distribution requires it.
client-dist: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist clients/python

# The C++ client (clients/cpp/Makefile): libkupclient.a, the example and
# the test program, plain and under ASan + UBSan, in clients/cpp/build
# (tests/cpp builds it too).
cpp-client: apt
	$(MAKE) -C clients/cpp -j2 all asan

test: build
	KUPD_REQUIRE_VM=1 $(PY) -m pytest tests

# Load without loss at full size: 64 clients x 10,000 sequenced messages
# (sessions and Calls) through kupd; `make test` runs the same test with
# 500 messages per client.  Takes ~15 minutes on 2 cores.
load-test: build
	KUPD_LOAD_MESSAGES=$${KUPD_LOAD_MESSAGES:-10000} $(PY) -m pytest -p no:cacheprovider -o timeout=7200 tests/load

# Compile every FreeBSD source (kupdev.ko glue + core + echo, libkup's
# FreeBSD backend) against FreeBSD's headers from the ziglang package, for
# amd64 and arm64 (tests/freebsd/test_compile.py runs it under `make test`).
kmod-freebsd-check: $(STAMP)/venv
	PYTHON=$(CURDIR)/$(PY) bash scripts/freebsd-check.sh $(if $(FREEBSD_CHECK_OUT),-o $(FREEBSD_CHECK_OUT))

# Linux kernel module end to end, in qemu VMs under TCG (also part of
# `make test`), once per kernel: bookworm's 6.1 and bookworm-backports' 6.12
# (both installed by scripts/setup-apt.sh).  Builds kup.ko/kup_echo.ko
# against each kernel's headers, boots each /boot/vmlinuz-<version> with a
# busybox initramfs of that kernel's virtio/9p modules, runs
# tests/vm/guest_tests.sh inside; the two VMs run at once (KUPD_VM_JOBS=1:
# one after the other).  KUPD_REQUIRE_VM=1 makes a missing kernel fail the
# run instead of skipping it.  Needs the apt packages of scripts/setup-apt.sh
# and ~3.5 GiB RAM; takes 3-4 minutes.  Under `make test` the VMs boot in the
# background from the start of the session, at niceness 10, while the other
# tests run (tests/vm/conftest.py, docs/linux.md).
vm-test: build
	$(MAKE) -C kmod/linux all-kernels
	KUPD_REQUIRE_VM=1 $(PY) -m pytest tests/vm

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

# Benchmarks (not part of `make test`): one run, a table, and
# bench/results/latest.{json,md}; see docs/performance.md.
bench: build
	PYTHONPATH=$(CURDIR)/bench:$(CURDIR)/clients/python:$(CURDIR) $(PY) -m kupbench $(BENCH_ARGS)

demo: build
	$(PY) -m kupd.demo

clean:
	$(MAKE) -C kmod clean
	$(MAKE) -C clients/cpp clean
	rm -rf $(STAMP) build
