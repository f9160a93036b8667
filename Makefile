# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install engines demo test lint chaos bench bench-gateway clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mlx,test,bench]'
	touch $(STAMP)

# llama.cpp's real llama-server (CPU) and its tiny GGUF, built once per pinned version from the
# llama-cpp-python sdist on PyPI (cache in ~/.cache/supervisord-llm; see tools/build_engines.sh).
engines: install
	PYTHON=$(BIN)/python tools/build_engines.sh

demo: install
	$(BIN)/supervisord-llm demo

test: install engines
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy
	$(BIN)/python -c "from tests.helpers import tiny_model_dir; tiny_model_dir()"
	@# The tests start the daemon, its gateway, llmctl and the stand-ins as new processes, thousands of
	@# times: their modules are compiled once here, also where PYTHONDONTWRITEBYTECODE keeps Python from
	@# caching what it compiles (each process would compile the project again).
	$(BIN)/python -m compileall -q supervisord_llm probes policies tests bench > /dev/null
	@# Tests that mostly wait (marker long_wait: real timers, held starts, wedged processes; little CPU)
	@# run beside the rest, two at a time (pytest-xdist, two workers), in a second pytest whose report
	@# follows the others'. Tests that judge an engine's decode rate (marker rates) need the machine to
	@# themselves: they run last, alone. Any of the three failing fails the target.
	@export SUPERVISORD_LLM_REQUIRE_ENGINES=1; \
	SUPERVISORD_LLM_TEST_PORT_SLICE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist load \
		--durations=15 -m "long_wait and not chaos_full and not gpu" > .long-wait-tests.log 2>&1 & waits=$$!; \
	$(BIN)/python -m pytest -q --durations=25 -m "not long_wait and not rates and not chaos_full and not gpu"; \
	rest=$$?; \
	wait $$waits; waited=$$?; \
	echo "---- tests that judge decode rates (marker rates), run alone ----"; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=8 -m "rates and not long_wait and not chaos_full and not gpu"; \
	rated=$$?; \
	echo "---- tests that mostly wait (marker long_wait), run beside the rest ----"; \
	cat .long-wait-tests.log; rm -f .long-wait-tests.log; \
	test $$rest -eq 0 && test $$waited -eq 0 && test $$rated -eq 0

lint: install
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy

# The whole chaos suite, and the long scenarios kept out of `make test` (marker chaos_full).
chaos: install engines
	$(BIN)/python -m pytest -q tests/chaos
	$(BIN)/python -m pytest -q -m "chaos_full and not gpu" tests/integration tests/unit

bench: install
	$(BIN)/python bench/run_all.py

# Gateway overhead (direct / nginx / gateway) and supervision under load; nginx from the
# distribution's package (apt-get install nginx), skipped with a note where it is missing.
bench-gateway: install
	$(BIN)/python bench/gateway_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .engines
