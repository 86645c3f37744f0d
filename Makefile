# Two entry points: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv and installs everything it needs on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-opt test bench lint system-deps clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e ".[hf]"
	touch $(STAMP)

# Debian packages: espeak-ng speaks the synthetic captions, sox checks audio, libsndfile reads it.
system-deps:
	@if ! command -v espeak-ng >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq espeak-ng libsndfile1 >/dev/null; \
	fi

demo: $(STAMP)
	$(PY) -m omni_core.cli demo

# OPT: VQ image tokenizer + opt-tiny on the nine tasks in 10 training minutes, then captioning,
# imagining and matching evaluated (runs/opt-demo/eval.json, runs/opt-demo/samples.png).
demo-opt: $(STAMP)
	$(PY) -m omni_core.cli demo --recipe opt

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# Every pytest-benchmark suite (training step packed vs padded, inference per modality, the CPU
# kernels; GPU suites skip without a GPU). Each run is saved under .benchmarks/ and printed next
# to the previous saved run (--benchmark-compare), so a regression shows.
bench: $(STAMP)
	$(PY) -m pytest -q $(wildcard benchmarks/bench_*.py) --benchmark-only --benchmark-autosave \
		--benchmark-compare --benchmark-sort=fullname --benchmark-columns=min,median,iqr,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info omni_core/_C*.so
