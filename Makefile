# gatewayd developer entry points. `make demo` and `make test` set up everything they need
# (Debian packages through apt-get, a virtualenv in .venv) on a fresh Debian 12 machine.

SHELL := /bin/bash
# Debian's own interpreter, so the venv matches what the .deb runs on.
PYTHON ?= /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the tests and the demo need (see ../shared/PLATFORM.md for why each is here).
APT_PACKAGES := \
	python3 python3-venv python3-dev gcc pkg-config libtss2-dev libsystemd-dev \
	swtpm swtpm-tools tpm2-tools tpm2-openssl tpm2-abrmd libtss2-tcti-tabrmd0 dbus \
	mosquitto mosquitto-clients systemd ca-certificates util-linux openssl sudo \
	python3-tpm2-pytss python3-paho-mqtt python3-cryptography python3-systemd python3-pyudev \
	python3-pytest python3-hypothesis \
	debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian \
	debootstrap systemd-container \
	umockdev gir1.2-umockdev-1.0 python3-gi iproute2

PYTEST_ARGS ?=

.PHONY: deps apt venv test test-venv test-debian test-system test-arm64 deb lint typecheck demo bench fuzz clean

deps: apt venv

# Idempotent: installs only what is missing, and runs `apt-get update` only then.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "make deps: installing Debian packages:" $$missing; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "make deps: Debian packages present"; fi

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements-dev.txt pyproject.toml | apt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

lint: deps
	$(VENV)/bin/ruff check gatewayd gatewayd_dev tests systest
	$(VENV)/bin/ruff format --check gatewayd gatewayd_dev tests systest

typecheck: deps
	$(VENV)/bin/mypy

# The whole suite: lint, types, then every test twice: on the pinned PyPI libraries in .venv, and on
# Debian's own python3-* packages (what the .deb runs on); then the .deb in booted Debian 12 and 13
# containers. CI runs exactly this (.ci/run). The two passes run one after the other: side by side (make
# -j2) they took 16 min instead of 30 on a 2-core machine, but the contention made timing-sensitive tests
# fail in two runs of two, so they stay sequential.
test: lint typecheck test-venv test-debian test-system

test-venv: deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-debian: deps
	@echo "== the same suite on Debian's packages: $$(dpkg-query -W -f='$${Package} $${Version}, ' \
	    python3-tpm2-pytss python3-paho-mqtt python3-cryptography)"
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# The package installed with apt in booted containers (systest/; needs root, through sudo when not root).
# Root file systems are cached in $${GATEWAYD_SYSTEST_CACHE:-/var/cache/gatewayd-systest}.
SYSTEST_TARGETS ?= bookworm/amd64 trixie/amd64
test-system: deb
	$(SUDO) env GATEWAYD_SYSTEST_TARGETS="$(SYSTEST_TARGETS)" \
	    $${GATEWAYD_SYSTEST_CACHE:+GATEWAYD_SYSTEST_CACHE="$$GATEWAYD_SYSTEST_CACHE"} \
	    $(VENV)/bin/pytest -p no:cacheprovider -s systest $(PYTEST_ARGS)

# The same on Debian 12 and 13 for arm64 (Raspberry Pi OS): slow, so not in `make test`. Debian 12 boots in
# a container under qemu-user; Debian 13's systemd cannot sandbox services there, so it boots as a whole
# virtual machine under qemu-system (gatewayd_dev/vm.py).
ARM64_PACKAGES := qemu-user-static qemu-system-arm
test-arm64: deb
	@missing=$$(for p in $(ARM64_PACKAGES); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing; fi
	$(MAKE) test-system SYSTEST_TARGETS="bookworm/arm64 trixie/arm64/vm"

demo: deps
	$(VPY) -m gatewayd_dev.demo $(DEMO_ARGS)

# Not part of `make test`: gatewayd against a tuned mosquitto bridge (docs/performance.md).
# BENCH_ARGS="--large" adds the 1000-sensor runs; --help lists the rest.
bench: deps
	$(VPY) -m gatewayd_dev.bench $(BENCH_ARGS)

# The codec and session fuzz target for longer than `make test` runs it (FUZZ_EXAMPLES per case).
FUZZ_EXAMPLES ?= 20000
fuzz: deps
	GATEWAYD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VPY) -m pytest -q tests/test_fuzz_session.py

# The Debian package, built from a copy of the work tree (so uncommitted changes are in it and dpkg-buildpackage
# writes nothing next to the repository): dist/gatewayd_VERSION_all.deb, checked by lintian (errors and
# warnings fail the build; overrides, each with its reason, are in debian/gatewayd.lintian-overrides).
DEB_VERSION = $(shell dpkg-parsechangelog -S Version 2>/dev/null)
deb: apt
	rm -rf build/deb && mkdir -p build/deb/gatewayd dist
	tar -c --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
	    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache \
	    --exclude=.hypothesis --exclude=./demo-run -f - . | tar -x -C build/deb/gatewayd
	# Debian's own toolchain and interpreters only, whatever else is first on PATH (pyenv, a venv).
	cd build/deb/gatewayd && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	lintian --fail-on error,warning --display-info \
	    build/deb/gatewayd_$(DEB_VERSION)_*.changes
	cp build/deb/gatewayd_$(DEB_VERSION)_all.deb dist/
	@echo "make deb: dist/gatewayd_$(DEB_VERSION)_all.deb"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
