# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs, answers a question about an example image
#   make test   -> creates .venv, installs (with the test extra), runs the test suite
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

.PHONY: demo test bench test-vllm
demo: $(STAMP)
	.venv/bin/idefics2 generate --image examples/shapes.png "What color is the circle?"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_load.py

# The vLLM plugin (plugins/vllm) in its own virtualenv, .venv-vllm: vLLM pins its own torch and transformers.
test-vllm:
	bash plugins/vllm/setup.sh
	.venv-vllm/bin/python -m pytest -p no:cacheprovider plugins/vllm/tests
