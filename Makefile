# From a fresh clone, one command each:
#   make demo   set up .venv, then run the README's main job on the shipped real data (outputs in runs/kang/)
#   make test   set up .venv, then run the tests
# Both reuse the environment on a second call: it is installed again only when pyproject.toml is newer than its
# stamp file ($(VENV)/.installed).  CI runs `make test VENV=.venv-ci` (.ci/run).
#
# The install is the README's manual route: torch pinned in the same pip call as the package (otherwise pip pulls
# the newest torch with several GB of CUDA packages), then pymde without its torchvision requirement
# (see pyro_vmm/_compat.py).  pip's output goes to $(VENV)/pip.log and is shown when the install fails.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYMDE ?= pymde==0.3.0
DATA ?= ../shared/data/scrna/kang_ifnb_2800.h5ad
DEMO_OUT ?= runs/kang

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip warnings about find-links folders that do not exist on this machine: noise in the failure log
PIP_NOISE := is ignored: it is neither a file nor a directory

.PHONY: setup demo test

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pyro-vmm and its dependencies into $(VENV) (a few minutes the first time; log: $(VENV)/pip.log)"
	@$(BIN)/python -m pip install -q $(TORCH) -e ".[test]" >$(VENV)/pip.log 2>&1 \
		|| { grep -v "$(PIP_NOISE)" $(VENV)/pip.log | tail -40; exit 1; }
	@$(BIN)/python -m pip install -q --no-deps $(PYMDE) >>$(VENV)/pip.log 2>&1 \
		|| { grep -v "$(PIP_NOISE)" $(VENV)/pip.log | tail -20; exit 1; }
	@$(BIN)/python -m pip check >/dev/null || true  # pymde's torchvision requirement is knowingly unmet
	$(BIN)/python -c "import scvi, pyro_vmm._compat as c; c.import_pymde()"
	@touch $@

# the main job runs once; `rm -r runs/kang` (or another DEMO_OUT=...) to run it again
demo: $(DEMO_OUT)/metrics.json
	@echo "the main job's outputs are in $(DEMO_OUT)/ (delete the folder to run it again)"

$(DEMO_OUT)/metrics.json: | $(STAMP)
	$(BIN)/pyro-vmm scrna --data $(DATA) --batch-key batch --labels-key cell_type --out $(DEMO_OUT)

test: $(STAMP)
	MPLBACKEND=Agg PYTHONHASHSEED=0 $(BIN)/python -m pytest -n 2 -q
