# Every target uses the project's own virtual environment; `make test` makes it when missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test lint clean run

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,dev,corpora]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy engine audit governance gateway contracts kit

# Two pytest-xdist workers, each taking whole files (a module's shared servers and models are
# built once); PYTEST_WORKERS=0 runs the suite in one process. pytest exits 5 when it
# collected nothing: that is a failure here, never a pass.
PYTEST_WORKERS ?= 2
test: $(STAMP) lint
	$(PY) -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "FAIL: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The README's first command: migrate, build the demo model once, create the demo principals
# once (keys in $FLEXGATE_HOME, mode 0600; printed with examples), then serve.
FLEXGATE_HOME ?= $(CURDIR)/var
FLEXGATE := FLEXGATE_HOME=$(FLEXGATE_HOME) $(PY) -m gateway.cli

run: $(STAMP)
	$(FLEXGATE) db upgrade
	test -f $(FLEXGATE_HOME)/demo-model/config.json || $(FLEXGATE) demo build
	$(FLEXGATE) demo principals
	$(FLEXGATE) serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
