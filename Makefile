# Two entry points: `make demo` and `make test`. Each installs what it needs, idempotently.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian's own interpreter (built with PGO+LTO: every command starts ~10% faster than on a plain source
# build), not whichever python3 comes first in PATH.
SYSTEM_PYTHON ?= /usr/bin/python3
DEB_PACKAGES := python3 python3-venv fuse3 libfuse3-3 mdevctl util-linux qemu-system-x86 qemu-utils gcc binutils libvirt-clients libxml2-utils chromium novnc iproute2 busybox-static xorriso isolinux syslinux-common pciutils swtpm swtpm-tools
STAMP_DEB := $(VENV)/.deb-installed
STAMP_PY := $(VENV)/.py-installed

.PHONY: demo test lint bench deps compile clean

deps: $(STAMP_DEB) $(STAMP_PY) compile

# Debian packages: only when something is missing (apt-get needs root, as the README says).
$(STAMP_DEB): Makefile
	@mkdir -p $(VENV)
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(STAMP_PY): pyproject.toml | $(STAMP_DEB)
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# An editable install leaves the package uncompiled; compile it, so that every command's start-up does
# not recompile it (and environments with PYTHONDONTWRITEBYTECODE=1 never would).
compile: $(STAMP_PY)
	@$(PY) -m compileall -q src/vgpuctl

demo: deps
	$(VENV)/bin/vgpuctl demo --serve

test: deps lint
	$(PY) -m pytest -q

lint: $(STAMP_PY)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: deps
	$(PY) bench/bench_sim.py
	$(PY) bench/bench_cli.py
	$(PY) bench/bench_doctor.py
	$(PY) bench/bench_vm.py
	$(PY) bench/bench_sriov.py
	$(PY) bench/bench_stream_compare.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
