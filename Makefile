# Fresh machine: `make demo` or `make test`. Both install what they need first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Production keeps the weights in weights/; a checkout without them uses the copy beside the project.
WEIGHTS_DIR ?= $(if $(wildcard weights/RealESRGAN_x4plus.pth),weights,../shared/weights)
export WEIGHTS_DIR

.PHONY: install demo test clean

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
