# portagent — every set-up step lives here so a clean Debian 12 machine needs only
# `make demo` and `make test` (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_APT := .cache/apt.stamp
STAMP_VENV := $(VENV)/.installed

# Debian packages the agent, the tests and the demo need at run time. netbase: its
# /etc/protocols lets nft print "tcp"/"udp" (numbers without it), which tests compare.
APT_PACKAGES := nftables libnftables1 conntrack iproute2 protobuf-compiler protobuf-compiler-grpc libprotobuf-dev \
	libsystemd-dev pkg-config python3-venv python3-dev gcc systemd procps netbase \
	postgresql libpq5 scdoc

# Debian packages to build the .deb and run the packaging test (make test needs none of them).
APT_PACKAGING := build-essential debhelper dh-python pybuild-plugin-pyproject python3-all \
	python3-setuptools python3-build python3-installer scdoc lintian debootstrap \
	systemd-container python3-grpcio python3-protobuf python3-nftables python3-pyroute2 \
	python3-psutil python3-systemd python3-cryptography git \
	python3-starlette python3-uvicorn python3-sqlalchemy python3-alembic python3-psycopg python3-psycopg2 \
	python3-jwt python3-pip python3-prometheus-client
STAMP_APT_PKG := .cache/apt-packaging.stamp

# Peers for `make bench` only; installed with service start blocked and their units disabled:
# firewalld/fail2ban/fwknopd must never run against the host's own firewall.
BENCH_APT_PACKAGES := fwknop-server fwknop-client fail2ban firewalld iptables dbus python3-dbus
STAMP_BENCH_APT := .cache/bench-apt.stamp

# google/rpc: AIP-193 error details (google.rpc.Status, ErrorInfo), vendored verbatim from
# googleapis (Debian has no python3 package of them) at their canonical paths, so a process
# that also loads googleapis-common-protos sees one definition, not a duplicate symbol.
PROTOS := proto/portagent/v1/agent.proto proto/portagent/v1/fleet.proto \
	proto/portagent/health/v1/health.proto \
	proto/google/rpc/status.proto proto/google/rpc/error_details.proto
# Generated code belongs to the wire distribution (same import paths: portagent.v1, google.rpc).
PB_OUT := wire/src/portagent/v1/agent_pb2.py wire/src/portagent/v1/fleet_pb2.py \
	wire/src/portagent/health/v1/health_pb2.py \
	wire/src/google/rpc/status_pb2.py wire/src/google/rpc/error_details_pb2.py
# The five distributions of the PEP 420 namespace `portagent`, installed editable.
DISTS := wire agent broker client testing

.PHONY: all deps venv proto test test-unit test-soak lint proto-lint demo deb test-packaging \
	test-clean-root bench clean

all: venv

# Each stamp depends on this Makefile: a package added to a list gets installed on
# machines set up before (the recipe only installs what is missing).
$(STAMP_APT): Makefile
	@mkdir -p .cache
	@if [ "$$(id -u)" != 0 ]; then echo "make: run as root (apt packages, network namespaces)"; exit 1; fi
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

deps: $(STAMP_APT)

$(STAMP_APT_PKG): Makefile | $(STAMP_APT)
	@missing=$$(for p in $(APT_PACKAGING); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

# Debian's protoc + grpc plugin: their output imports on Debian's grpcio 1.51 /
# protobuf 3.21 and on current PyPI releases alike (docs/adr/0002-protobuf-codegen.md).
$(PB_OUT) &: $(PROTOS) | $(STAMP_APT)
	cd proto && protoc -I. --python_out=../wire/src --grpc_python_out=../wire/src \
		--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin $(patsubst proto/%,%,$(PROTOS))

proto: $(PB_OUT)

# One pip call resolves the four local distributions against each other (agent needs
# portagent-wire==VERSION, which is on no index). Each editable install maps its
# packages into the venv; with no portagent/__init__.py anywhere, the namespace spans
# all four. A venv made before the split holds the old single `portagent`
# distribution (a regular package in src/, its own console scripts): removed first.
# The generated code comes first: an editable install maps only the packages that
# exist when it runs (google.rpc has no tracked file before protoc writes it).
$(STAMP_VENV): pyproject.toml $(DISTS:%=%/pyproject.toml) | $(STAMP_APT) $(PB_OUT)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -q -y portagent
	$(PY) -m pip install -q $(DISTS:%=-e ./%) -e '.[dev]'
	@touch $@

venv: $(STAMP_VENV) $(PB_OUT)

lint: venv
	$(VENV)/bin/ruff check $(DISTS) tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# buf lint (STANDARD, see buf.yaml) with the buf CLI from the npm registry (@bufbuild/buf).
BUF := .cache/buf/node_modules/.bin/buf
$(BUF): | $(STAMP_APT)
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm)
	mkdir -p .cache/buf && npm install --silent --no-audit --no-fund --prefix .cache/buf @bufbuild/buf@1.75.0

# `buf breaking` compares proto/ with the last release, v0.1.0 (git tag v0.1.0), named by
# its commit: a fresh CI clone may carry no tags, and a shallow one not even the commit
# (then it is fetched from origin, that one commit only).
PROTO_BASELINE := bdca7dddad73b6877e4f83bd8c6325a0db6be040

# Outside a git checkout (an unpacked tarball, like the clean-root check's) there is no
# history to compare with: buf lint only, and it says so. CI's own step runs in a clone.
proto-lint: $(BUF)
	$(BUF) lint
	@if ! git rev-parse --git-dir >/dev/null 2>&1; then \
		echo "proto-lint: not a git checkout: buf breaking skipped (it needs the history)"; \
	else \
		git cat-file -e '$(PROTO_BASELINE)^{commit}' 2>/dev/null || \
			git fetch -q --no-tags --depth=1 origin $(PROTO_BASELINE); \
		echo "$(BUF) breaking --against '.git#ref=$(PROTO_BASELINE)'"; \
		$(BUF) breaking --against '.git#ref=$(PROTO_BASELINE)'; \
	fi

# $(BUF): tests/e2e/test_reflection.py lists the daemons' services with `buf curl`.
test: venv lint $(BUF)
	$(PY) -m pytest

test-unit: venv
	$(PY) -m pytest tests/unit

# Long fault/soak runs (marker `soak`), which `make test` skips (pyproject addopts).
test-soak: venv
	$(PY) -m pytest -m soak tests

demo: venv
	$(PY) scripts/demo.py

# The Debian source package and its four binary packages in dist/: portagent (agent),
# portagent-broker, python3-portagent-wire (the code both share) and portagent-request
# (the requester's client), lintian-clean.
deb: $(STAMP_APT_PKG) $(STAMP_APT)
	bash packaging/build-deb.sh dist

# Build the .debs; install each into a cached bookworm rootfs (the agent and wire: boot
# systemd there; the broker and wire alone: run it), purge each, nothing left behind.
test-packaging: venv $(STAMP_APT_PKG)
	$(PY) -m pytest -m packaging tests/packaging

# The README's quick start, verbatim, in a clean bookworm root (the packaging test's
# cached rootfs under a throwaway overlay, `git archive HEAD` copied in): catches a
# set-up step that only works because this machine has something installed by hand.
test-clean-root: $(STAMP_APT_PKG)
	bash scripts/clean-root-check.sh

$(STAMP_BENCH_APT): Makefile | $(STAMP_APT)
	@missing=$$(for p in $(BENCH_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing (services kept off): $$missing"; guard=; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; guard=1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; rc=$$?; \
		if [ -n "$$guard" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
		for u in $$missing; do case $$u in firewalld|fail2ban|fwknop-server) systemctl disable --quiet $$u.service 2>/dev/null || true;; esac; done; \
		[ $$rc = 0 ] || exit $$rc; \
	fi
	@touch $@

# Benchmarks side by side with fwknop, fail2ban, firewalld and a per-rule baseline; rewrites
# docs/benchmarks.md. Not part of make test. BENCH_ARGS=--quick for a ~3 minute smoke run.
bench: venv $(STAMP_BENCH_APT)
	@if [ "$$(id -u)" != 0 ]; then echo "make bench: run as root (network namespaces, nftables)"; exit 1; fi
	$(PY) -m bench.run --out docs/benchmarks.md $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache build dist *.egg-info $(DISTS:%=%/src/*.egg-info) $(DISTS:%=%/build) $(PB_OUT) $(PB_OUT:_pb2.py=_pb2_grpc.py)
