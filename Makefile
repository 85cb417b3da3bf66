# Robustness-analysis pipeline.
#   make test                 install (once) and run the test suite
#   make reproduce            the whole workflow on the default config → results/default/REPORT.md
#   make reproduce CONFIG=configs/mnist_full.yaml
#   make smoke                the whole workflow on the tiny smoke config
# Stages are keyed on their output files: an unchanged stage is not rerun.

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
CONFIG     ?= configs/default.yaml
RUN        := $(or $(shell sed -n 's/^name:[[:space:]]*\([A-Za-z0-9_.-]*\).*/\1/p' $(CONFIG) 2>/dev/null),default)
RES        := results/$(RUN)
LOGS       := $(RES)/logs
COMMON     := config.py artifacts.py mnistload.py cnnmodel.py metrics.py $(CONFIG) $(STAMP)

.PHONY: all install test smoke reproduce bench clean-run help
.DELETE_ON_ERROR:

all: help
help:
	@sed -n '2,6p' Makefile

# --- environment: created once; reinstalled only when a requirements file changes --------------
$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(PY) -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), v"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# --- the pipeline ----------------------------------------------------------------------------
# $(call stage,NAME,COMMAND): run COMMAND with its output in $(LOGS)/NAME.log and print one line:
# the stage's last summary line and wall time, or the failure with the log's tail and path.
define stage
	@mkdir -p $(LOGS)
	@start=$$(date +%s); \
	if $(2) > $(LOGS)/$(1).log 2>&1; then \
	  echo "[$(1)] done in $$(( $$(date +%s) - start )) s: $$(grep -E '^\[' $(LOGS)/$(1).log | tail -n 1)"; \
	else \
	  echo "[$(1)] FAILED after $$(( $$(date +%s) - start )) s; last lines of $(LOGS)/$(1).log:"; \
	  tail -n 5 $(LOGS)/$(1).log | sed 's/^/    /'; exit 1; \
	fi
endef

# train → cc_remove → retrain (+compare) → mutation, conductance → detectors → adversarial → report
$(RES)/robustness_original.json: main.py deepfool.py robustness.py $(COMMON)
	$(call stage,train,$(PY) main.py --config $(CONFIG))

$(RES)/kept_indices.json: cc_remove.py dif_dsa.py $(RES)/robustness_original.json
	$(call stage,cc_remove,$(PY) cc_remove.py --config $(CONFIG))

$(RES)/compare.json: $(RES)/kept_indices.json
	$(call stage,retrain,$(PY) main.py --config $(CONFIG) -is_retrain True)

$(RES)/lcr_test.npz: mutation.py $(RES)/robustness_original.json
	$(call stage,mutation,$(PY) mutation.py --config $(CONFIG))

$(RES)/conductance_test.npz: conductance.py $(RES)/robustness_original.json
	$(call stage,conductance,$(PY) conductance.py --config $(CONFIG))

$(RES)/detectors.json: detectors.py $(RES)/lcr_test.npz $(RES)/conductance_test.npz $(RES)/kept_indices.json
	$(call stage,detectors,$(PY) detectors.py --config $(CONFIG))

$(RES)/adversarial.json: adversarial.py $(RES)/compare.json
	$(call stage,adversarial,$(PY) adversarial.py --config $(CONFIG))

$(RES)/REPORT.md: report.py $(RES)/compare.json $(RES)/detectors.json $(RES)/adversarial.json
	$(call stage,report,$(PY) report.py --config $(CONFIG))

reproduce: $(RES)/REPORT.md
	@echo "[reproduce] $(RUN): report at $(RES)/REPORT.md; logs in $(LOGS)/"

smoke:
	$(MAKE) --no-print-directory reproduce CONFIG=configs/smoke.yaml

# Benchmarks need the trained default models (make reproduce) and, for peers, bench/requirements.txt.
BENCH_PY   := $(if $(wildcard .venv-bench/bin/python),.venv-bench/bin/python,$(PY))
bench: $(RES)/robustness_original.json
	$(BENCH_PY) bench/bench_deepfool.py --config $(CONFIG)
	$(PY) bench/bench_dsa.py --config $(CONFIG)
	$(PY) bench/bench_mutation.py --config $(CONFIG)
	$(PY) bench/bench_conductance.py --config $(CONFIG)

clean-run:
	rm -rf model/$(RUN) $(RES)
