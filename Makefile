# cgipool — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/pool.yaml
# The proxy's URL for the tools; empty: they take it from $(CONFIG)'s first listener.
URL ?=
TOOL_TARGET = $(if $(strip $(URL)),--url $(URL)) --config $(CONFIG)
RUN_DIR ?= run
PIDFILE ?= $(RUN_DIR)/cgipool.pid
LOGFILE ?= $(RUN_DIR)/cgipool.log
CC ?= gcc
CFLAGS ?= -O2 -Wall -Wextra -Werror -std=gnu11
LDLIBS ?= -lm
TRIAL_ARGS ?= tests
ARGS ?=
SHOT ?= docs/dashboard.png
LOAD ?= 3

# Every services/<name>/ with a service.yaml and C sources builds to build/<name>.cgi.
C_SERVICES := $(sort $(foreach m,$(wildcard services/*/service.yaml),\
	$(if $(wildcard $(dir $(m))*.c),$(notdir $(patsubst %/,%,$(dir $(m)))))))
C_BINARIES := $(addprefix build/,$(addsuffix .cgi,$(C_SERVICES)))
# Every services/<name>/ with a service.yaml and C# sources builds to build/<name>.exe
# with Mono's mcs, and to build/<name>-dotnet/ with the .NET SDK, when installed.
# Without either the service shows `unavailable` (its manifest's `runtimes`).
CS_SERVICES := $(sort $(foreach m,$(wildcard services/*/service.yaml),\
	$(if $(wildcard $(dir $(m))*.cs),$(notdir $(patsubst %/,%,$(dir $(m)))))))
MCS := $(shell command -v mcs 2>/dev/null)
DOTNET := $(shell command -v dotnet 2>/dev/null)
CS_BINARIES := $(if $(MCS),$(addprefix build/,$(addsuffix .exe,$(CS_SERVICES))))
DOTNET_BUILDS := $(if $(DOTNET),$(foreach s,$(CS_SERVICES),\
	$(if $(wildcard services/$(s)/*.csproj),build/$(s)-dotnet/.built)))
LIB_SOURCES := $(wildcard services/lib/*.c)
LIB_HEADERS := $(wildcard services/lib/*.h)
INSTALLED := $(VENV)/.installed
CHAOS_SECONDS ?= 30
FUZZ_SECONDS ?= 75

.PHONY: help all venv run start-bg stop restart reload status smoke-test stress-test dashboard-shot test private-names import-cycles test-twisted-latest bench bench-quick bench-big bench-elastic chaos fuzz clean distclean

help:
	@echo "make all          build the C services into build/"
	@echo "make run          set up (venv, build) and run the daemon in the foreground ($(CONFIG))"
	@echo "                  (pidfile $(PIDFILE): make stop/status/reload work from another shell)"
	@echo "make start-bg     run the daemon in the background; returns once every service is ready"
	@echo "make stop         stop the background daemon; returns when no process is left"
	@echo "make restart      stop + start-bg; SERVICE=name: a rolling restart of that service"
	@echo "make reload       re-read etc/pool.yaml in the running daemon (zero downtime)"
	@echo "make status       table of services and workers"
	@echo "make smoke-test   request every route's examples; non-zero exit on any failure"
	@echo "make stress-test  load test of the worker routes, e.g. ARGS=\"-c 20 -d 10\" (or -t 1000;"
	@echo "                  CGI routes too: --service NAME or --all); a summary per service"
	@echo "make dashboard-shot  PNG of the admin page of the running daemon ($(SHOT)), after"
	@echo "                  LOAD=$(LOAD) s of load (LOAD= for none; ARGS=\"--page /admin/traffic\" for more pages)"
	@echo "make test         run the test suite (trial)"
	@echo "make private-names  list the Twisted private names cgipool/ uses; fails above the"
	@echo "                  baseline (scripts/twisted_private_names.baseline; ARGS=--update-baseline)"
	@echo "make import-cycles  the package-level import cycles of cgipool/; fails on one not"
	@echo "                  in scripts/import_cycles.baseline (ARGS=--update-baseline removes)"
	@echo "make test-twisted-latest  the suite against the newest Twisted on PyPI (own venv)"
	@echo "make bench        cgipool against direct, nginx and Twisted baselines (~3 min);"
	@echo "                  bench/results/latest.md + .png; ARGS=\"--no-big\" etc. (bench/run.py -h)"
	@echo "make bench-quick  the same as a few-second smoke run (CI; timings not judged)"
	@echo "make bench-big    only the 10k idle clients and 1 GB body checks"
	@echo "make bench-elastic scale-up, kill -9 replacement, chaos, rolling restart, reload"
	@echo "make chaos        CHAOS_SECONDS of attack + kill -9 under load; 0 failed, no RSS/fd growth"
	@echo "make fuzz         hypothesis fuzzing of the parsers, FUZZ_SECONDS per property (4 of them)"
	@echo "make clean        remove build outputs, logs and trial temp folders"

all: $(C_BINARIES) $(CS_BINARIES) $(DOTNET_BUILDS)
ifneq ($(CS_SERVICES),)
ifeq ($(MCS)$(DOTNET),)
	@echo "make: no C# compiler (mcs or dotnet): $(CS_SERVICES) will show as unavailable" \
	      "(Debian: apt-get install mono-mcs)"
endif
endif

build:
	mkdir -p build

.SECONDEXPANSION:
build/%.cgi: $$(wildcard services/%/*.c) $(LIB_SOURCES) $(LIB_HEADERS) | build
	$(CC) $(CFLAGS) -o $@ $(filter %.c,$^) $(LDLIBS)

build/%.exe: $$(wildcard services/%/*.cs) | build
	$(MCS) -warnaserror -optimize+ -nologo -out:$@ $(filter %.cs,$^)

# A failed .NET build is a warning: the next runtime candidate (Mono) still runs.
build/%-dotnet/.built: $$(wildcard services/%/*.cs) $$(wildcard services/%/*.csproj) | build
	$(DOTNET) build services/$*/ -c Release -o build/$*-dotnet --nologo && touch $@ || \
	  echo "make: warning: dotnet build of services/$* failed; the service uses its next runtime"

venv: $(INSTALLED)

# An editable install in setuptools' default mode: with `package_dir = =.` (setup.cfg)
# it is a .pth naming this folder, so twistd finds twisted/plugins/cgipool_plugin.py
# from any folder.  Built by the venv's own setuptools (upgraded first): no download
# per install, and the same build tests/test_install.py checks for warnings.
$(INSTALLED): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test]'
	touch $@

# The same pidfile as start-bg (removed on exit): status, stop, reload and start-bg
# see a daemon that `make run` started in another shell.
run: venv all
	@mkdir -p $(RUN_DIR)
	@if [ -f $(PIDFILE) ] && kill -0 $$(cat $(PIDFILE)) 2>/dev/null; then \
		echo "cgipool is already running (pid $$(cat $(PIDFILE))); make stop first"; exit 1; fi
	$(BIN)/twistd --nodaemon --pidfile $(PIDFILE) cgipool --config $(CONFIG)

start-bg: venv all
	@mkdir -p $(RUN_DIR)
	@if [ -f $(PIDFILE) ] && kill -0 $$(cat $(PIDFILE)) 2>/dev/null; then \
		echo "cgipool is already running (pid $$(cat $(PIDFILE)))"; exit 0; fi; \
	rm -f $(PIDFILE); since=$$(date +%s.%N); \
	$(BIN)/twistd --pidfile $(PIDFILE) --logfile $(LOGFILE) cgipool --config $(CONFIG) && \
	$(BIN)/cgipool wait-ready $(TOOL_TARGET) --pidfile $(PIDFILE) --timeout 30 --since $$since

stop: venv
	$(BIN)/cgipool stop --pidfile $(PIDFILE)

# make restart SERVICE=search: a rolling restart (replacement ready before each
# old worker drains); without SERVICE: the whole daemon, stop + start-bg.
ifneq ($(strip $(SERVICE)),)
restart: venv all
	$(BIN)/cgipool restart $(TOOL_TARGET) $(SERVICE)
else
restart: stop start-bg
endif

reload: venv all
	$(BIN)/cgipool reload $(TOOL_TARGET)

status: venv
	$(BIN)/cgipool status $(TOOL_TARGET)

smoke-test: venv
	$(BIN)/cgipool smoke-test $(TOOL_TARGET)

stress-test: venv
	$(BIN)/cgipool stress-test $(TOOL_TARGET) $(ARGS)

# Headless Chromium (apt-get install chromium chromium-driver) against the running daemon.
dashboard-shot: venv
	$(BIN)/cgipool dashboard-shot $(TOOL_TARGET) --out $(SHOT) $(if $(strip $(LOAD)),--load $(LOAD)) $(ARGS)

test: venv all
	$(BIN)/trial $(TRIAL_ARGS)

# The ratchet of issue 15: uses of Twisted private names in cgipool/ may only go
# down (docs/ARCHITECTURE.md, "Twisted internals in use").  The venv's python: the
# script reads the installed Twisted's source to know which names are Twisted's.
private-names: venv
	$(BIN)/python scripts/twisted_private_names.py $(ARGS)

# Issue 15: no package-level import cycle.  Until then cycles may only go away
# (docs/ARCHITECTURE.md, "Package import cycles").  Reads the source, imports nothing.
import-cycles: venv
	$(BIN)/python scripts/import_cycles.py $(ARGS)

# The suite against the newest Twisted on PyPI, in a venv of its own (the pin in
# setup.cfg keeps the main one below Twisted's next major).  When the newest is the
# version `make test` just ran with, that run covered it: said, not run twice.
LATEST_VENV ?= .venv-twisted-latest
test-twisted-latest: venv all
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet --upgrade pip setuptools
	$(LATEST_VENV)/bin/pip install --quiet --no-build-isolation -e '.[test]'
	$(LATEST_VENV)/bin/pip install --quiet --upgrade --no-deps twisted
	@pinned=$$($(BIN)/python -c 'import twisted; print(twisted.__version__)'); \
	latest=$$($(LATEST_VENV)/bin/python -c 'import twisted; print(twisted.__version__)'); \
	echo "test-twisted-latest: pinned Twisted $$pinned, newest $$latest"; \
	if [ "$$pinned" = "$$latest" ] && [ -z "$(FORCE)" ]; then \
		echo "test-twisted-latest: the newest Twisted is the pinned one: make test covered it (FORCE=1 runs it again)"; \
	else $(LATEST_VENV)/bin/trial $(TRIAL_ARGS); fi

# Benchmarks: every process they start (daemon, workers, baselines, nginx) is
# stopped at the end, also on Ctrl-C.  wrk and nginx are used when installed.
bench: venv all
	$(BIN)/python bench/run.py $(ARGS)

bench-quick: venv all
	$(BIN)/python bench/run.py --quick $(ARGS)

bench-big: venv all
	$(BIN)/python bench/run.py --only-big $(ARGS)

bench-elastic: venv all
	$(BIN)/python bench/elastic.py $(ARGS)

chaos: venv all
	$(BIN)/python bench/chaos.py --seconds $(CHAOS_SECONDS) $(ARGS)

fuzz: venv
	CGIPOOL_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/trial tests.test_fuzz

clean:
	rm -rf build _trial_temp _trial_temp.lock $(RUN_DIR)/*.log

distclean: clean
	rm -rf $(VENV) $(LATEST_VENV) $(RUN_DIR) *.egg-info
