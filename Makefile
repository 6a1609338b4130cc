# ridestream: `make demo` runs the whole lifecycle locally, `make test` passes the tests; `make` lists every target.
SHELL := /bin/bash
# A bare `make` lists the targets instead of installing anything.
.DEFAULT_GOAL := help
# The Python the venv is made with, by the first `make setup` (a venv already there is kept): 3.11, the deployables'
# Python; where python3 is another version, name one, e.g. `make demo PYTHON=python3.11`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
CHECKOV := $(VENV)/tools/checkov/bin/checkov
CHECKOV_VERSION := 3.3.30
# The documentation site's builder (mkdocs.yml; `make docs`, tests/test_docs_site.py): a venv of its own too.
DOCS_TOOL := $(VENV)/tools/docs
MKDOCS := $(DOCS_TOOL)/bin/mkdocs
DOCS_PACKAGES := mkdocs==1.6.1 mkdocs-material==9.8.2
# The inference libraries benchmarks/inference_candidates.py compares the serving form with (a venv of their own).
CANDIDATES := $(VENV)/tools/candidates
CANDIDATE_PACKAGES := onnxruntime==1.32.0 onnx==1.23.2 skl2onnx==1.20.0 treelite==4.8.1
# The google provider's generated bindings (hashicorp/google 6.50.0), the source of infra/google-provider-schema.json.
GOOGLE_PROVIDER_BINDINGS := 16.12.1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: help setup browser screenshot test test-fast lint docs demo env down redeploy rollback status watch train promote resolve flow \
	monitor bench bench-capacity bench-candidates coarse-model provider-schema lock clean gcp-up gcp-down gcp-status gcp-rollback gcp-proxy

# Every target with a `##` description, in this file's order; docs/reference/make-targets.md is the same list
# (python -m devstack.reference --write). Targets without one (the stamp files) are this file's own.
help:  ## this list (a bare `make` prints it too)
	@awk 'BEGIN {FS = ":[^#]*## "} /^[A-Za-z0-9_-]+:[^=#]*## / {printf "  %-17s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))

# The venv is refreshed whenever the lock file, the project's metadata or this file changes. uv is installed
# into the venv itself, so a machine without uv gets the same, fast install path. The project is
# installed too (editable, without dependencies: the lock has them), so its packages import from anywhere.
# Bytecode is compiled at install: with PYTHONDONTWRITEBYTECODE set (as on many machines and in every image)
# nothing is cached later, and each process of the suite would compile MLflow, pandas and scikit-learn again.
$(VENV)/.installed: requirements.lock pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(VENV)/bin/python -m pip install --quiet uv
	$(UV) pip install --python $(PY) --quiet --compile-bytecode -r requirements.lock
	$(UV) pip install --python $(PY) --quiet --no-deps --editable .
	@touch $@

# Each deployable's own environment (devstack/deployables.py): built from nothing but what its image or upload
# installs, so the local stack runs each as Google Cloud would; made again whenever one of those files changes.
DEPLOYABLE_FILES := serving_function/requirements.txt backend/requirements.txt backend/Dockerfile rollout/requirements.txt \
	rollout/Dockerfile tracking_server/requirements.txt tracking_server/Dockerfile devstack/deployables.py
$(VENV)/deployables/.installed: $(VENV)/.installed $(DEPLOYABLE_FILES)
	$(PY) -m devstack.deployables build
	@touch $@

# The tests' tools, each in a venv of its own (made again when this file, and so their pins, changes; uv comes from
# the venv): checkov scans infra/ and pins many packages of its own; mkdocs and the Material theme pin theirs
# (Markdown, pymdown-extensions, ...). Only the tests and `make docs` need them, so `make demo` never installs them.
$(VENV)/tools/checkov/.installed: Makefile | $(VENV)/.installed
	test -x $(CHECKOV) || $(UV) venv --quiet --python $(PY) $(VENV)/tools/checkov
	$(UV) pip install --python $(VENV)/tools/checkov/bin/python --quiet checkov==$(CHECKOV_VERSION)
	@touch $@
$(DOCS_TOOL)/.installed: Makefile | $(VENV)/.installed
	test -x $(DOCS_TOOL)/bin/python || $(UV) venv --quiet --python $(PY) $(DOCS_TOOL)
	$(UV) pip install --python $(DOCS_TOOL)/bin/python --quiet $(DOCS_PACKAGES)
	@touch $@
TEST_TOOLS := $(VENV)/tools/checkov/.installed $(DOCS_TOOL)/.installed

setup: $(VENV)/.installed $(VENV)/deployables/.installed  ## the venv from requirements.lock and each deployable's own (what the demo needs)

# The rider page's browser tests drive Debian's chromium through Debian's chromedriver (the same
# release, from the same archive); nothing downloads a browser build of its own. apt needs root
# (sudo where it is there); the package lists are refreshed only if the install cannot find them.
BROWSER_PACKAGES := chromium chromium-driver
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo )env DEBIAN_FRONTEND=noninteractive apt-get
browser:  ## Debian's chromium and chromedriver, for the browser tests (apt; sudo when not root)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "installing Debian's $(BROWSER_PACKAGES) for the browser tests"; \
		$(APT_GET) install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null \
		|| { $(APT_GET) update -q >/dev/null && $(APT_GET) install -y -q --no-install-recommends $(BROWSER_PACKAGES) >/dev/null; }; }
	@chromium --version && chromedriver --version

# The pytest workers of `make test`, each test file on one of them (its module fixtures, stacks and emulators stay
# together). Three: most of the suite waits on processes it started, so two cores are better used with a third
# file under way. The suite passes with a core taken by stress-ng on two workers, about the same contention.
TEST_WORKERS ?= 3

test: setup $(TEST_TOOLS) browser  ## ruff, then the whole suite on TEST_WORKERS workers (3), a test file each
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The README's and the site's picture of the rider page, taken by the browser test itself on the real local stack.
SCREENSHOT := docs/images/rider-page.png
screenshot: setup browser  ## retake the README's picture of the rider page, on the real local stack
	RIDER_PAGE_SCREENSHOT=$(SCREENSHOT) $(PY) -m pytest -q -p no:randomly \
		"tests/test_rider_browser.py::test_a_ride_from_zone_names_to_the_models_answer_and_its_outcome[0]"
	@echo "wrote $(SCREENSHOT)"

test-fast: setup $(TEST_TOOLS)  ## unit tests only: no emulator, no stack
	$(PY) -m pytest -m "not integration and not e2e"

lint: setup  ## ruff check and ruff format --check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# NO_MKDOCS_2_WARNING: Material for MkDocs prints at every build that it reaches its end of life on 2027-05-05
# (Zensical is its successor); said once here instead of in every build's output.
docs: setup $(DOCS_TOOL)/.installed  ## build the documentation site into site/ (mkdocs build --strict)
	NO_MKDOCS_2_WARNING=1 $(MKDOCS) build --strict

demo: setup  ## the local stack and the whole lifecycle on it; leaves the stack up (make env, make down)
	$(PY) -m devstack demo

# The running stack's client environment, e.g. `eval "$(make env)"`: its output is only export lines.
env:  ## export lines pointing this shell at the running stack: eval "$(make env)"
	@$(PY) -m devstack env

down:  ## stop every process of the local stack, by PID
	$(PY) -m devstack down

redeploy: setup  ## deploy what the registry calls production now, if the local function serves anything else
	$(PY) -m devstack redeploy

rollback: setup  ## production <- previous in the stack's registry; the rollout service rolls the function back
	$(PY) -m devstack rollback

watch: setup  ## a live view of the local stream (Ctrl-C stops)
	$(PY) -m devstack watch

status: setup  ## the local stack: services, and registry vs deployed vs answering riders (exit 1 on a mismatch)
	$(PY) -m devstack status

# train, promote, resolve, flow and monitor use the registry MLFLOW_TRACKING_URI names: the repository's mlflow.db
# unless it is set, e.g. to the local stack's by `eval "$(make env)"`.
train: setup  ## train on Jan 2021 (validation Feb, test Mar) and register a version in MLFLOW_TRACKING_URI's registry
	$(PY) -m training.train

promote: setup  ## production <- version N in the registry: make promote VERSION=N
	@test -n "$(VERSION)" || { echo "make promote VERSION=N: which registered version becomes production" >&2; exit 2; }
	$(PY) -m training.registry promote --version $(VERSION)

resolve: setup  ## the registry's production version: its number, RUN_ID and artifact URI, as JSON
	$(PY) -m training.registry resolve

flow: setup  ## the Prefect training flow: train, compare with production, promote only if better
	$(PY) -m flows.training_flow

monitor: setup  ## drift report of Feb 2021 against the Jan 2021 reference (needs a production model: make flow)
	$(PY) -m flows.monitoring_flow --reference-month 2021-01 --current-month 2021-02

# Every benchmark but two with targets of their own: bench-capacity (one JSON document, long) and bench-candidates
# (a venv of its own).
bench: setup  ## train, function, backend, stream, fault, bootstrap, abuse and rollout benchmarks (JSON each)
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/function_bench.py
	$(PY) benchmarks/backend_bench.py
	$(PY) benchmarks/stream_bench.py
	$(PY) benchmarks/fault_bench.py
	$(PY) benchmarks/bootstrap_bench.py
	$(PY) benchmarks/abuse_bench.py
	$(PY) benchmarks/rollout_bench.py

bench-capacity: setup  ## not in bench: per-ride costs on the local stack, the Google Cloud model at 10-10,000 rides/s, training at scale
	@$(PY) benchmarks/capacity.py  # @: its stdout is one JSON document

bench-candidates: setup  ## not in bench: ONNX Runtime, treelite and the serving form on the same model (a venv of its own)
	test -x $(CANDIDATES)/bin/python || $(UV) venv --quiet --python $(PY) $(CANDIDATES)
	$(UV) pip install --python $(CANDIDATES)/bin/python --quiet -r requirements.lock $(CANDIDATE_PACKAGES)
	$(UV) pip install --python $(CANDIDATES)/bin/python --quiet --no-deps --editable .
	$(CANDIDATES)/bin/python benchmarks/inference_candidates.py

coarse-model: setup  ## rebuild backend/coarse_model.json and backend/zone_guide.json from Jan 2021 (overwrites them)
	$(PY) -m training.coarse --month 2021-01 --out backend/coarse_model.json --zones-out backend/zone_guide.json

provider-schema: setup  ## regenerate infra/google-provider-schema.json (after adding a resource type to infra/)
	tmp=$$(mktemp -d) && $(PY) -m pip download --quiet --no-deps -d $$tmp cdktf-cdktf-provider-google==$(GOOGLE_PROVIDER_BINDINGS) \
		&& $(PY) infra/provider_schema.py $$tmp/*.whl; status=$$?; rm -rf $$tmp; exit $$status

# Your own Google Cloud project (docs/deploy-gcp.md): make gcp-up PROJECT=my-project [REGION=... ENV=...] [DRY_RUN=1].

# The region the gcp-* targets make and find everything in (`--region`).
REGION ?= europe-west1
# The deployment's name, part of every resource's name and of its Terraform state's (`--env`): up to 8 lower-case
# letters and digits; one project holds as many deployments as names.
ENV ?= prod
# Only the command line names it: POSIX shells read a startup file named by an environment variable ENV, which some
# machines export, and a deployment must never be named after that file.
ifeq ($(origin ENV),environment)
ENV := prod
endif
GCP := $(PY) -m operations.gcp --project=$(PROJECT) --region=$(REGION) --env=$(ENV) $(if $(DRY_RUN),--dry-run)
gcp-up: setup  ## from an empty project to a ride answered (make gcp-up PROJECT=id): bootstrap, images, the system, the first model
	$(GCP) up
gcp-down: setup  ## everything gcp-up made, the state bucket last (asks first)
	$(GCP) down
gcp-status: setup  ## registry vs deployed vs answering riders, and live quality (exit 1 on a mismatch)
	$(GCP) status
gcp-rollback: setup  ## production <- previous in the registry; the controller rolls the function back
	$(GCP) rollback
gcp-proxy: setup  ## the MLflow UI on localhost:5000 through gcloud run services proxy (your identity, Cloud Run IAM)
	$(GCP) proxy

lock:  ## requirements.lock again from pyproject.toml (Python 3.11)
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

# The stack's processes are found by the PIDs in .stack/: stopped before it goes, or they would run on, unowned.
clean:  ## stop the local stack if one runs, then delete the venvs, caches, mlflow.db, mlruns, .stack and site/
	test ! -x $(PY) || $(PY) -m devstack down
	rm -rf $(VENV) .pytest_cache .ruff_cache mlruns mlartifacts mlflow.db .stack site *.egg-info
