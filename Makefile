# Two commands set everything up on a fresh Debian 12 machine (as root):
#   make demo   - run a container through a private containerd with this shim
#   make test   - lint (ruff, mypy --strict), the whole test suite (unit + integration against
#                 real containerd/runc), then the integration suite again with crun as the OCI
#                 runtime (test-crun) and in namespace mode, one shim for every task (test-namespace)
# The newest CPython >= 3.12 on the machine (pyenv's or on PATH), else python3. 3.12+ matters:
# the warm template makes its heap immortal (PEP 683) so forked shims share it; on 3.11
# everything works, with ~2.5 MiB more private memory per shim.
ifndef PYTHON
PYTHON := $(shell for v in 3.13 3.12; do \
	  for p in $$HOME/.pyenv/versions/$$v*/bin/python$$v /usr/bin/python$$v /usr/local/bin/python$$v; do \
	    [ -x "$$p" ] && "$$p" -c pass 2>/dev/null && { echo "$$p"; exit 0; }; done; done; echo python3)
endif
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := containerd runc crun criu busybox-static containernetworking-plugins gcc libc6-dev
STAMP := $(VENV)/.installed-$(PYVER)
# runc's exec step (shim/thp/thp_exec.c): lets the shim start runc with vfork instead of
# forking the interpreter. Static, so its exec costs no dynamic loading; without a C
# compiler the shim falls back to a preexec_fn (slower, same behaviour).
THP_EXEC := shim/thp/thp-exec
# The start action's relay to the warm template (shim/launch/start_relay.c): a start
# without an interpreter when a template is up; bin/containerd-shim-runc-v2-py uses
# it when it was built.
START_RELAY := shim/launch/start-relay
HELPERS := $(THP_EXEC) $(START_RELAY)

.PHONY: setup apt venv demo lint test test-runc test-crun test-namespace unit install uninstall proto clean bench soak

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# protobuf compiled here from its sdist instead of PyPI's binary wheel, once per virtualenv
# (~25 s on 2 cores; pip caches the build): see README, "protobuf from source".
PROTOBUF_STAMP := $(VENV)/.protobuf-from-source
PROTOBUF_FROM_SOURCE = $(1) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
	--no-binary protobuf -c constraints.txt protobuf || \
	echo "warning: could not build protobuf from source: the binary wheel stays (~160 KiB more per forked shim)"

venv: $(STAMP) $(PROTOBUF_STAMP) $(HELPERS)

# Static, so their exec costs no dynamic loading; either may be missing (no C compiler):
# the shim then falls back to pure Python for that step (slower, same behaviour).
$(THP_EXEC): shim/thp/thp_exec.c
	cc -O2 -s -Wall -Werror -static -o $@ $< 2>/dev/null || cc -O2 -s -Wall -Werror -o $@ $< || \
		echo "warning: could not build $@: runc will be started with a preexec_fn (slower)"
$(START_RELAY): shim/launch/start_relay.c
	cc -O2 -s -Wall -Werror -static -o $@ $< 2>/dev/null || cc -O2 -s -Wall -Werror -o $@ $< || \
		echo "warning: could not build $@: every start runs a Python launcher (slower)"

# Byte-compile at install time: the environment sets PYTHONDONTWRITEBYTECODE,
# and a shim that recompiled its sources on every container start would be slow.
$(STAMP): pyproject.toml constraints.txt
	@if [ -x $(PY) ] && ! [ "$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$(PYVER)" ]; then \
		echo "recreating $(VENV) for Python $(PYVER)"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' --config-settings editable_mode=compat
	$(PY) -m compileall -q shim integration
	touch $@

$(PROTOBUF_STAMP): $(STAMP)
	$(call PROTOBUF_FROM_SOURCE,$(PY))
	touch $@

demo: setup
	$(PY) -m integration.demo

# ruff over all the Python, a strict type check of the shim, the import contracts of the
# package's process boundaries; all run, fails if any failed.
# Rules and settings: [tool.ruff], [tool.mypy] and [tool.importlinter] in pyproject.toml.
lint: venv
	@rc=0; $(VENV)/bin/ruff check shim tests integration bench conftest.py || rc=1; \
	$(VENV)/bin/mypy || rc=1; \
	$(VENV)/bin/lint-imports --no-cache --no-logo || rc=1; exit $$rc

# Every pass always runs (a lint or runc failure does not hide the later results); fails if any failed.
test: setup
	@rc=0; $(MAKE) --no-print-directory lint || rc=1; \
	$(MAKE) --no-print-directory test-runc || rc=1; \
	$(MAKE) --no-print-directory test-crun || rc=1; \
	$(MAKE) --no-print-directory test-namespace || rc=1; exit $$rc

test-runc: setup
	SHIM_RUNC_BINARY= $(PY) -m pytest -q -p no:cacheprovider

# The integration suite with BinaryName = "crun" for every ctr run/create of our runtime
# (integration/harness.py SHIM_RUNC_BINARY); on a hybrid cgroup host conftest.py binds
# hugetlb to cgroup v1 for the session and undoes it (crun 1.8 refuses it on v2).
test-crun: setup
	SHIM_RUNC_BINARY=crun $(PY) -m pytest -q -p no:cacheprovider integration

# The integration suite with ShimGroup = "namespace" for every ctr run/create of our
# runtime (integration/harness.py SHIM_PY_GROUP): one shim serves every task.
test-namespace: setup
	SHIM_PY_GROUP=namespace $(PY) -m pytest -q -p no:cacheprovider integration

# Only the unit tests (no root, no containerd): the `unit` marker, set by conftest.py on tests/.
# Other passes by marker: `$(PY) -m pytest -m integration` (root), `-m cri`, `-m "integration and not cri"`.
unit: venv
	$(PY) -m pytest -q -p no:cacheprovider -m unit

# Go shim vs this shim in one private containerd (root; sets and restores THP):
#   make bench                      full run, ~5-15 min; results in bench/results/latest.*
#   make bench BENCH_ARGS=--quick   smoke run
bench: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null || \
		$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,bench]' --config-settings editable_mode=compat
	$(PY) -m bench $(BENCH_ARGS)

# Go shim vs this shim under churn, containerd restarts, kills, stuck containers, hostile
# clients and a fuzzer, in one private containerd (root); not part of make test:
#   make soak                       full run, <= 30 min on 2 cores; results in soak/results/latest.*
#   make soak SOAK_ARGS=--quick     smoke run, ~2 min
soak: setup
	$(PY) -m soak $(SOAK_ARGS)

# Make any containerd on this machine find the shim (runtime io.containerd.runc.v2-py): the
# package is built as a wheel and pip-installed, with the tested versions (constraints.txt),
# into its own virtualenv under LIBDIR; BINDIR gets a copy of its entry point with that
# virtualenv's path written in, so it works wherever it is put (containerd also takes a
# runtime by absolute path). The checkout is not needed afterwards. The C helpers built here
# (thp-exec, start-relay) are copied into the installed package at the same paths; a plain
# `pip install .` has none and works without them (slower: a preexec_fn, the Python launcher).
BINDIR ?= /usr/local/bin
LIBDIR ?= /usr/local/lib/containerd-shim-runc-v2-py
SHIM_BIN := containerd-shim-runc-v2-py
install: setup
	rm -rf build/wheel && $(PY) -m pip wheel -q --disable-pip-version-check --no-deps -w build/wheel .
	rm -rf $(LIBDIR) && $(PYTHON) -m venv $(LIBDIR)
	$(LIBDIR)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt build/wheel/*.whl
	$(call PROTOBUF_FROM_SOURCE,$(LIBDIR)/bin/python)
	sed -i 's|^venv=$$|venv=$(LIBDIR)|' $(LIBDIR)/bin/$(SHIM_BIN)
	for helper in $(HELPERS); do [ -x $$helper ] || continue; \
		for lib in $(LIBDIR)/lib/python3*/site-packages; do cp $$helper $$lib/$$helper; done; done
	$(LIBDIR)/bin/python -m compileall -q $(LIBDIR)/lib
	install -d $(BINDIR)
	install -m 755 $(LIBDIR)/bin/$(SHIM_BIN) $(BINDIR)/.$(SHIM_BIN).tmp
	grep -qx 'venv=$(LIBDIR)' $(BINDIR)/.$(SHIM_BIN).tmp
	mv -f $(BINDIR)/.$(SHIM_BIN).tmp $(BINDIR)/$(SHIM_BIN)

uninstall:
	rm -f $(BINDIR)/$(SHIM_BIN)
	rm -rf $(LIBDIR)

proto: venv
	$(PY) -m shim.proto.generate

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache $(HELPERS)
	find shim integration tests -name __pycache__ -type d -prune -exec rm -rf {} +
