# Robustness-analysis pipeline.
#   make test                 install (once) and run the test suite
#   make reproduce            the whole workflow on the default config → results/default/REPORT.md
#   make reproduce CONFIG=configs/mnist_full.yaml
#   make reproduce EXECUTOR=ray  the (stage, variant, seed) units as Ray tasks (README "Running on a cluster")
#   make smoke                the whole workflow on the tiny smoke config
#   make reproduce JOBS=2     two independent stages at once (default 1; see the note at reproduce)
# Stages are keyed on their outputs and on the config keys they read: an unchanged stage is not rerun.

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
CONFIG     ?= configs/default.yaml
EXECUTOR   ?=
EXEC       := $(if $(EXECUTOR),--set executor=$(EXECUTOR))
RUN        := $(or $(shell sed -n 's/^name:[[:space:]]*\([A-Za-z0-9_.-]*\).*/\1/p' $(CONFIG) 2>/dev/null),default)
RES        := results/$(RUN)
EXPLAIN    := $(shell sed -n 's/^run_explanation:[[:space:]]*\(true\).*/\1/p' $(CONFIG) 2>/dev/null)
LOGS       := $(RES)/logs

.PHONY: all install test smoke reproduce bench clean-run help
.DELETE_ON_ERROR:

all: help
help:
	@sed -n '2,7p' Makefile

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
	  echo "[$(1)] done in $$(( $$(date +%s) - start )) s: $$(tr '\r' '\n' < $(LOGS)/$(1).log | grep -E '^\[' | tail -n 1)"; \
	else \
	  echo "[$(1)] FAILED after $$(( $$(date +%s) - start )) s; last lines of $(LOGS)/$(1).log:"; \
	  tail -n 5 $(LOGS)/$(1).log | sed 's/^/    /'; exit 1; \
	fi
endef

# train baseline → cc_remove (DSA, removal sets) → train every other variant → robustness radius,
# adversarial → compare (variants.json) ; baseline → mutation, conductance → detectors ; → report.
# Each stage depends on its code, its inputs' files and its stamp: results/<run>/.stamps/<stage>.json
# holds the config keys that stage reads (stage.py) and is rewritten only when one of them changes,
# so editing e.g. adv_n_test reruns the adversarial stage and what follows it, not the training.
STAMPS     := $(RES)/.stamps
DONE       := $(RES)/.done
TRAINED    := $(RES)/variants/baseline/train.json
VARIANTS   := $(DONE)/train_variants
CODE       := config.py artifacts.py mnistload.py cnnmodel.py metrics.py stage.py variants.py executor.py $(STAMP)

.PHONY: FORCE
FORCE:
$(STAMPS)/%.json: FORCE | $(STAMP)
	@$(PY) stage.py stamp $* --config $(CONFIG)

$(TRAINED): main.py $(CODE) $(STAMPS)/train.json
	$(call stage,train,$(PY) main.py --config $(CONFIG) $(EXEC) --no-measure)

$(RES)/subsets.json: cc_remove.py dif_dsa.py $(CODE) $(TRAINED) $(STAMPS)/cc_remove.json
	$(call stage,cc_remove,$(PY) cc_remove.py --config $(CONFIG))

$(VARIANTS): main.py $(wildcard regimes.py) $(CODE) $(RES)/subsets.json $(STAMPS)/train_variants.json
	$(call stage,train_variants,$(PY) main.py --config $(CONFIG) $(EXEC) --variant all --no-measure)
	@mkdir -p $(DONE) && touch $@

$(RES)/robustness.json: robustness.py deepfool.py $(CODE) $(TRAINED) $(VARIANTS) $(STAMPS)/robustness.json
	$(call stage,robustness,$(PY) robustness.py --config $(CONFIG) $(EXEC))

$(RES)/lcr_test.npz: mutation.py $(CODE) $(TRAINED) $(STAMPS)/mutation.json
	$(call stage,mutation,$(PY) mutation.py --config $(CONFIG))

$(RES)/conductance_test.npz: conductance.py $(CODE) $(TRAINED) $(STAMPS)/conductance.json
	$(call stage,conductance,$(PY) conductance.py --config $(CONFIG))

$(RES)/detectors.json: detectors.py $(CODE) $(RES)/lcr_test.npz $(RES)/conductance_test.npz $(RES)/subsets.json $(STAMPS)/detectors.json
	$(call stage,detectors,$(PY) detectors.py --config $(CONFIG))

$(RES)/adversarial.json: adversarial.py $(CODE) $(TRAINED) $(VARIANTS) $(STAMPS)/adversarial.json
	$(call stage,adversarial,$(PY) adversarial.py --config $(CONFIG) $(EXEC))

$(RES)/explanation.json: explanation.py $(CODE) $(RES)/robustness.json $(RES)/adversarial.json $(STAMPS)/explanation.json
	$(call stage,explanation,$(PY) explanation.py --config $(CONFIG))

$(RES)/variants.json: compare.py $(CODE) $(RES)/robustness.json $(RES)/adversarial.json $(STAMPS)/compare.json
	$(call stage,compare,$(PY) compare.py --config $(CONFIG))

$(RES)/REPORT.md: report.py $(CODE) $(RES)/variants.json $(RES)/detectors.json $(RES)/adversarial.json $(if $(EXPLAIN),$(RES)/explanation.json) $(STAMPS)/report.json
	$(call stage,report,$(PY) report.py --config $(CONFIG))

# JOBS=2 runs two independent stages at once (e.g. train_variants beside mutation and conductance).
# Not the default: on the 2-core machine it was slower (after 12.3 min, robustness and adversarial
# had not started; the in-process stages' BLAS/OpenMP threads spin when the cores are oversubscribed:
# detectors 24 s → 147 s, cc_remove 43 s → 76 s), but a machine with more cores than one stage's
# units use may gain. Results are the same either way (each stage's threads are fixed by the
# config, not by the load). With Ray, keep JOBS=1 (each stage may start its own local Ray instance).
JOBS       ?= 1
reproduce:
	@$(MAKE) --no-print-directory -j$(JOBS) $(RES)/REPORT.md
	@echo "[reproduce] $(RUN): report at $(RES)/REPORT.md; logs in $(LOGS)/"

smoke:
	$(MAKE) --no-print-directory reproduce CONFIG=configs/smoke.yaml

# Benchmarks need the trained default models (make reproduce) and, for peers, bench/requirements.txt.
BENCH_PY   := $(if $(wildcard .venv-bench/bin/python),.venv-bench/bin/python,$(PY))
bench: $(TRAINED)
	$(BENCH_PY) bench/bench_deepfool.py --config $(CONFIG)
	$(PY) bench/bench_dsa.py --config $(CONFIG)
	$(PY) bench/bench_mutation.py --config $(CONFIG)
	$(PY) bench/bench_conductance.py --config $(CONFIG)

clean-run:
	rm -rf model/$(RUN) $(RES)
