# Fresh machine: `make demo` or `make test`. Both install what they need first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Production keeps the weights in weights/; a checkout without them uses the copy beside the project.
WEIGHTS_DIR ?= $(if $(wildcard weights/RealESRGAN_x4plus.pth),weights,../shared/weights)
export WEIGHTS_DIR

.PHONY: install demo test clean load-test

install: $(STAMP)

$(STAMP): requirements.txt requirements-models.txt requirements-dev.txt pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch $@

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output output_upscaled .pytest_cache

# Reliability: 200 jobs through 3 worker processes with faults injected (several minutes; not part of `make test`)
load-test: $(STAMP)
	$(PY) scripts/load_test.py --jobs 200 --workers 3 --json load-test.json
