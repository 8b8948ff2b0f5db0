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
	python3-pytest python3-hypothesis

PYTEST_ARGS ?=

.PHONY: deps apt venv test test-venv test-debian lint typecheck demo bench clean

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
	$(VENV)/bin/ruff check gatewayd gatewayd_dev tests
	$(VENV)/bin/ruff format --check gatewayd gatewayd_dev tests

typecheck: deps
	$(VENV)/bin/mypy

# The whole suite: lint, types, then every test twice: on the pinned PyPI libraries in .venv, and on
# Debian's own python3-* packages (what the .deb runs on). CI runs exactly this (.ci/run).
test: lint typecheck test-venv test-debian

test-venv: deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-debian: deps
	@echo "== the same suite on Debian's packages: $$(dpkg-query -W -f='$${Package} $${Version}, ' \
	    python3-tpm2-pytss python3-paho-mqtt python3-cryptography)"
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

demo: deps
	$(VPY) -m gatewayd_dev.demo $(DEMO_ARGS)

# Not part of `make test`: gatewayd against a tuned mosquitto bridge (docs/performance.md).
# BENCH_ARGS="--large" adds the 1000-sensor runs; --help lists the rest.
bench: deps
	$(VPY) -m gatewayd_dev.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
