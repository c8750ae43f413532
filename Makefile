# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
NPROC  ?= 2
# the CPU build of torch lies on this machine's disk; pinning it keeps pip from pulling a multi-GB CUDA build
TORCH_PIN ?= torch==2.13.0

.PHONY: install train test bench data rl clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# the benchmarks' peers (DeepSpeed) on top; its CUDA ops are not built (DS_BUILD_OPS=0: the CPU peers need none)
$(BENCH_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

install: $(STAMP)

data: $(STAMP)
	$(PY) -m launch.prepare_data

# TORCHRUN_ARGS: torchrun's own flags (e.g. --max-restarts=3); a restarted worker group gets its own rendezvous store
train: data
	TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 $(VENV)/bin/torchrun --standalone $(TORCHRUN_ARGS) --nproc-per-node=$(NPROC) -m launch.train parallel=dualpipe $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)

rl: $(STAMP)
	$(PY) -m launch.rl $(ARGS)

bench: $(BENCH_STAMP)
	$(PY) -m bench.run $(ARGS)

clean:
	rm -rf outputs wandb
