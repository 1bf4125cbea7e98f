# make demo   set up .venv if needed, then compress the shipped demo model offline and print the report path
# make test   set up .venv if needed, then run the test suite (what CI runs)
# make test-latest  the suite against the newest releases pyproject.toml allows, in .venv-latest; reports what moved
# make lock   rewrite constraints.txt from the working .venv (after a green make test-latest: adopt what moved)
# make bench  benchmarks against the peer (llm-compressor); not part of make test
# make sweep  a 2 x 2 sweep of RTN variants of the demo model (SWEEP=file, SWEEP_FLAGS='--parallel 2', '--backend ray', '--dry-run')
#
# On a GPU box, keep your CUDA torch: `make test VENV=/path/to/env-with-torch` (torch is installed only
# if missing), or `make test VENV_FLAGS=--system-site-packages` to see a system-wide torch.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
# The CPU wheel that CI machines have on disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.compress-installed
# The versions the suite is known to pass with (torch excepted: TORCH_SPEC). pyproject.toml keeps ranges for users;
# make test and CI install inside these pins so a new release cannot turn a fresh machine's suite red.
CONSTRAINTS ?= constraints.txt
DEMO_OUT ?= compress-out/demo

.PHONY: venv demo test test-fast test-latest lock typecheck bench bench-scale sweep clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS) -e ".[dev]"
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/compress run recipes/demo.yaml --output $(DEMO_OUT) --overwrite

SWEEP ?= scripts/sweep-demo.yaml
SWEEP_FLAGS ?=
sweep: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/compress sweep $(SWEEP) $(SWEEP_FLAGS)

typecheck: $(STAMP)
	$(PY) -m mypy -p compress

# Two workers (pytest-xdist), each test file on one of them, one torch thread each (tests/conftest.py): the suite's
# single-threaded stretches no longer leave a core idle. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: typecheck
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The scheduled check: a venv of the newest allowed releases (torch stays TORCH_SPEC: an eager upgrade would pull
# a multi-GB CUDA build), the whole suite, and the versions that moved
# against constraints.txt (scripts/versions_moved.py). Exit status is the suite's.
LATEST_VENV ?= .venv-latest
test-latest:
	@test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	@$(LATEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(LATEST_VENV)/bin/python -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install --disable-pip-version-check -q --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/python scripts/versions_moved.py $(CONSTRAINTS)
	HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m pytest -q

lock: $(STAMP)
	$(PY) scripts/versions_moved.py $(CONSTRAINTS) --write

# The peer pins its own transformers range, so it gets a venv of its own and never changes .venv.
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
bench:
	@test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	@$(BENCH_PY) -c "import torch" 2>/dev/null || $(BENCH_PY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)"
	$(BENCH_PY) -m pip install --disable-pip-version-check -q -e ".[bench,lm-eval]"
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/run.py --output bench/results/quantization.md
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/pruning.py
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/allocation.py
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/zero_shot.py
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/robust.py
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/offload.py
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/serving_formats.py
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/real_shapes.py
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/eval_memory.py
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/cli_startup.py
	HF_HUB_OFFLINE=1 $(BENCH_PY) bench/demo_results.py
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/report_page.py
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/serving_weights.py
	HF_HUB_OFFLINE=1 MKL_DYNAMIC=FALSE PYTHONPATH=. $(BENCH_PY) bench/threads.py
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/whole_job.py --rounds 3
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/whole_job.py --model random-1024 --rounds 2 --samples 32 --eval-windows 32 --output bench/results/whole_job_1024.md
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/layer_width.py --rounds 2 --samples 32
	HF_HUB_OFFLINE=1 $(PY) bench/same_weights.py --before d298d0d --before-new b1b3440^1
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/tokenize_once.py
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BENCH_PY) bench/rotation.py
	scripts/llama_cpp.sh >/dev/null && HF_HUB_OFFLINE=1 $(PY) bench/llama_cpp_quantize.py
	$(BENCH_PY) bench/assemble.py --output BENCHMARKS.md

# Hours on a 2-core CPU: writes a random 8B-parameter checkpoint under /tmp and compresses it lazily.
bench-scale: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/scale.py
	$(PY) bench/assemble.py --output BENCHMARKS.md

clean:
	rm -rf compress-out .pytest_cache
