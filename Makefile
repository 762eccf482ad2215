# metaleg — the two commands of the README, and their parts.
#   make demo   the agent at work in a local network-namespace lab (root)
#   make test   install everything from scratch, then lint, type-check and run the whole suite

VENV     ?= .venv
PYTHON   ?= python3
PY        = $(VENV)/bin/python
APT_PACKAGES = iptables ipset nftables iproute2 conntrack iputils-ping kmod procps python3-venv shellcheck

.PHONY: demo check-root test install apt venv lint typecheck pytest clean

demo: check-root install
	@$(PY) -m tests.lab.demo

# The demo builds network namespaces and installs packages: say so plainly instead of failing in apt.
check-root:
	@if [ "$$(id -u)" != 0 ]; then echo "make demo: run it as root (it builds network namespaces and installs Debian packages)" >&2; exit 1; fi

test: install lint typecheck pytest

install: apt venv

# Debian packages the agent and the lab need (python-iptables loads libxtables/libiptc from iptables).
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

lint:
	$(VENV)/bin/ruff check metaleg tests
	$(VENV)/bin/ruff format --check metaleg tests

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
