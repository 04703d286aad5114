# storypipe — set-up, tests and the main entry points.
# `make install` then `make test` is all a fresh machine needs.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# nltk looks in $(sys.prefix)/nltk_data, so WordNet installed there needs no environment variable.
NLTK_DATA_DIR := $(VENV)/nltk_data

.PHONY: install test lint wordnet clean finetune-llava finetune-storygen eval toy toy-data demo dry-run

# Training and evaluation entry points. Override on the command line, e.g.
#   make finetune-llava LLAVA_DATA=data/llava-10k
#   make finetune-llava STORYPIPE="$(CURDIR)/.venv/bin/accelerate launch --num_processes 4 -m storypipe.cli"
#   make eval PRESET=toy STORYPIPE="$(CURDIR)/.venv/bin/torchrun --nproc_per_node 2 -m storypipe.cli"   (CPU processes)
PRESET     ?= vist
STORYPIPE  ?= $(VENV)/bin/storypipe
LLAVA_DATA ?= data/llava
STORY_DATA ?= data/vist
RUNS       ?= runs
RESUME     ?=
# The toy models (ShapeStories, trained on a CPU): `make toy` rebuilds them, `make demo` tells a story.
TOY_MODELS ?= models/toy
TOY_RUNS   ?= $(RUNS)/toy
TOY_DATA   := $(TOY_RUNS)/data
DEMO_IMAGE ?= examples/seed.png
DEMO_CAPTION ?= Rosa waved hello in the green meadow.
ifeq ($(PRESET),toy)
EVAL_DATA  ?= $(TOY_DATA)
else
EVAL_DATA  ?= $(STORY_DATA)
endif

install: $(VENV)/.installed wordnet

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first: the pinned CPU wheel on dev machines; a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $@

# METEOR needs WordNet offline; it comes from Debian's wordnet-base (see scripts/install-wordnet.sh).
wordnet: $(NLTK_DATA_DIR)/corpora/wordnet/lexnames

$(NLTK_DATA_DIR)/corpora/wordnet/lexnames: scripts/install-wordnet.sh
	bash scripts/install-wordnet.sh $(NLTK_DATA_DIR)/corpora/wordnet

test:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache

# The vist preset's generate path at the real model sizes with random weights (nothing downloaded): about
# 10 minutes on 2 CPU cores with a 2-layer language model; the full depth on a GPU. Not part of `make test`.
dry-run:
	HF_HUB_OFFLINE=1 $(STORYPIPE) dry-run --preset vist

.PHONY: bench
bench:
	HF_HUB_OFFLINE=1 $(PY) bench/bench_vist_load.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_captioners.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_storygen.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_startup.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_contention.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_many.py

# One denoising step at SD 1.5 size and 512² (random weights from the shipped configs), each mode against
# plain SD: about an hour on 2 CPU cores, so not part of `make bench` or CI.
.PHONY: bench-fullsize
bench-fullsize:
	HF_HUB_OFFLINE=1 $(PY) bench/bench_fullsize.py

# Both captioner adapters, on the output of `storypipe prepare-llava --out $(LLAVA_DATA)`.
finetune-llava:
	$(STORYPIPE) finetune-llava --task story --data $(LLAVA_DATA)/story_next.json --images $(LLAVA_DATA)/images \
		--out $(RUNS)/llava-story --preset $(PRESET) $(RESUME)
	$(STORYPIPE) finetune-llava --task description --data $(LLAVA_DATA)/description.json --images $(LLAVA_DATA)/images \
		--out $(RUNS)/llava-description --preset $(PRESET) $(RESUME)

# The frame generator's context layers, on a VIST-layout folder (descriptions as captions).
finetune-storygen:
	$(STORYPIPE) finetune-storygen --data $(STORY_DATA) --out $(RUNS)/storygen --preset $(PRESET) $(RESUME)

# The papers' metric tables on EVAL_DATA's test split, into $(RUNS)/eval-$(PRESET)/results.md.
# Several GPUs: make eval STORYPIPE="$(CURDIR)/.venv/bin/accelerate launch --num_processes 4 -m storypipe.cli"
eval: $(if $(filter toy,$(PRESET)),$(TOY_DATA)/sis)
	$(STORYPIPE) eval --data $(EVAL_DATA) --out $(RUNS)/eval-$(PRESET) --preset $(PRESET)

# Every toy model from scratch on the CPU (about 25 minutes on 2 cores); see scripts/make-toy.sh.
toy: $(VENV)/.installed
	STORYPIPE=$(STORYPIPE) TOY_MODELS=$(TOY_MODELS) TOY_RUNS=$(TOY_RUNS) bash scripts/make-toy.sh

# The toy dataset alone (ShapeStories is deterministic: the same seed gives the same bytes).
toy-data: $(TOY_DATA)/sis

$(TOY_DATA)/sis:
	$(STORYPIPE) toy-data --out $(TOY_DATA) --preset toy

# A 5-frame story from the shipped toy models, offline on the CPU.
demo:
	HF_HUB_OFFLINE=1 $(STORYPIPE) generate --preset toy --image $(DEMO_IMAGE) --caption "$(DEMO_CAPTION)" \
		--out stories/demo --overwrite
	@echo "Storyboard: $(CURDIR)/stories/demo/storyboard.html"
