# Everyday targets. The README's two commands (scripts/start.sh, scripts/test.sh) need no make;
# these are the same steps, named, for developers and CI.
PYTHON ?= .venv/bin/python
VENV_BIN := $(dir $(PYTHON))
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/llm-optimizer/optimizerd:$(VERSION)

.PHONY: help install test lint bench run protos docker-build k8s-render release audit clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install:  ## a .venv with the project and the test and development tools
	[ -x $(PYTHON) ] || python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[test,dev]"

test:  ## the whole test suite, exactly as CI runs it
	bash scripts/test.sh -q

lint: install  ## ruff, shellcheck, hadolint, yamllint, actionlint, stale generated protos
	$(VENV_BIN)ruff check --select E,F,W,B,UP --line-length 100 ipc supervisor workers tests scripts
	$(VENV_BIN)shellcheck -x scripts/*.sh .ci/run
	$(VENV_BIN)hadolint etc/docker/Dockerfile
	$(VENV_BIN)yamllint -c etc/docker/.yamllint etc/docker/compose.yaml etc/docker/compose.prod.yaml
	$(VENV_BIN)yamllint -d relaxed etc/kubernetes etc/prometheus etc/helm/llm-optimizer/values.yaml
	$(VENV_BIN)actionlint .github/workflows/*.yml
	$(PYTHON) scripts/gen_protos.py --check

bench:  ## every benchmark; figures go to docs/benchmarks.md by hand
	for bench in scripts/bench_*.py; do $(PYTHON) $$bench || exit 1; done

run:  ## optimizerd on its built-in defaults, in the foreground
	bash scripts/start.sh

protos:  ## regenerate protos/llm_optimizer/v1/*_pb2*.py from the .proto files
	$(PYTHON) scripts/gen_protos.py

docker-build:  ## the container image (needs docker)
	docker build -f etc/docker/Dockerfile -t $(IMAGE) .

k8s-render:  ## the Helm chart rendered to stdout, offline (VALUES=file.yaml to add values)
	$(PYTHON) scripts/render_chart.py $(if $(VALUES),-f $(VALUES))

release:  ## wheel and sdist in dist/, checked by twine
	rm -rf dist
	$(PYTHON) -m build --outdir dist
	$(VENV_BIN)twine check --strict dist/*

audit: install  ## known vulnerabilities in the installed dependencies
	$(VENV_BIN)pip-audit --skip-editable

clean:  ## build outputs and caches (not .venv)
	rm -rf dist build *.egg-info .pytest_cache .ruff_cache
