# Two commands set everything up on a fresh Debian 12 machine (as root):
#   make demo   - run a container through a private containerd with this shim
#   make test   - the whole test suite (unit + integration against real containerd/runc)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := containerd runc crun criu busybox-static
STAMP := $(VENV)/.installed

.PHONY: setup apt venv demo test unit install uninstall proto clean

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(STAMP)

# Byte-compile at install time: the environment sets PYTHONDONTWRITEBYTECODE,
# and a shim that recompiled its sources on every container start would be slow.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat
	$(PY) -m compileall -q shim integration
	touch $@

demo: setup
	$(PY) -m integration.demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

# Make any containerd on this machine find the shim (runtime io.containerd.runc.v2-py).
install: setup
	ln -sf $(CURDIR)/bin/containerd-shim-runc-v2-py /usr/local/bin/containerd-shim-runc-v2-py

uninstall:
	rm -f /usr/local/bin/containerd-shim-runc-v2-py

proto: venv
	$(PY) -m shim.proto.generate

clean:
	rm -rf $(VENV) build *.egg-info
	find shim integration tests -name __pycache__ -type d -prune -exec rm -rf {} +
