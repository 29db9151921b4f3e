# Two commands do everything on a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint mutation clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## the whole pipeline on the built-in synthetic demo (config/config.yaml)
	$(BIN)/snakemake all --cores $(CORES) --configfile config/config.yaml
	$(BIN)/snakemake --configfile config/config.yaml --report report.html
	@echo "demo done: tables in results/tables/, figures in results/*/figures/, everything in report.html"

test: $(STAMP)  ## the test suite (what CI runs)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cmrcnet scripts tests bench
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

# Mutation testing of the modules that carry the science (pyproject [tool.mutmut]; docs/testing.md): on demand,
# not in CI. `make mutation` runs every mutant (hours on 2 cores); `make mutation MUTANTS='cmrcnet.evaluation.tables*'`
# one module. Survivors are listed by `mutmut results` and explained in docs/testing.md.
MUTANTS ?=
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet "mutmut>=3.8,<4"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run $(MUTANTS)  # one torch thread per mutmut child
	$(BIN)/mutmut results

clean:
	rm -rf data processed models results logs ablation crossmodal .snakemake report.html
