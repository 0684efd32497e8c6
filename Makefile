# tproxy: the two set-up commands of the README are `make demo` and `make test`.
# Both install what they need on a fresh Debian machine (run as root).

PYTHON  ?= /usr/bin/python3
VENV    ?= .venv
PYTEST_ARGS ?=

.PHONY: all deps venv demo test bench man-check clean

all: venv

deps:
	sh tools/install-deps

# Debian's python3, not a per-user one: tproxy runs as `nobody` under inetd
# and after -r, so its interpreter must be readable by everyone.
venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: deps venv
	$(VENV)/bin/python tools/demo.py

test: deps venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: deps venv
	$(VENV)/bin/python bench/bench.py

man-check:
	groff -man -ww -z man/tproxy.8 man/ipchains-translate.8

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
