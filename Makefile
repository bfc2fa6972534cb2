# hardwire — every target creates .venv on first use.
#   make demo    compile stories260K into a chip, simulate it, print the story it writes
#   make test    the test suite (CI runs this)
#   make models  download the real models (pinned sha256) into $(MODELS)
#   make bench   tool/chip speed benchmarks -> BENCHMARKS.md figures
#   make synth   full stories260K ECP5 build (long) -> build/synth/

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Where the real models live. CI points this at ../shared/models.
MODELS ?= models
export HARDWIRE_MODELS := $(abspath $(MODELS))
# Two pytest workers (CI has 2 cores); a test file stays on one worker so its fixtures are
# built once. PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

MODEL_BASE := https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K
GGUF_URL   := https://huggingface.co/ggml-org/models/resolve/main/tinyllamas/stories260K.gguf

.PHONY: setup test demo models bench synth clean help

help:
	@sed -n '1,8p' Makefile

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

models:
	@$(BIN)/python -c 'pass' 2>/dev/null || $(MAKE) --no-print-directory setup
	@mkdir -p $(MODELS)
	@$(call fetch,stories260K.bin,$(MODEL_BASE)/stories260K.bin,b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696)
	@$(call fetch,tok512.bin,$(MODEL_BASE)/tok512.bin,037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312)
	@$(call fetch,tok512.model,$(MODEL_BASE)/tok512.model,dfff07d929db979913f166ec94a6f5ecad4c70cfed8eb5c9cbe7e464455e46f5)
	@$(call fetch,stories260K.gguf,$(GGUF_URL),270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d)

# fetch NAME URL SHA256: keep a file whose hash matches, else download to a temp file and check
define fetch
	f=$(MODELS)/$(1); \
	if [ -f $$f ] && echo "$(3)  $$f" | sha256sum -c --status; then echo "ok  $$f"; else \
	  echo "get $(2)"; curl -fsSL -o $$f.part '$(2)' && \
	  (echo "$(3)  $$f.part" | sha256sum -c --status || { echo "sha256 mismatch for $(1)"; rm -f $$f.part; exit 1; }) && \
	  mv $$f.part $$f; fi
endef

test: $(STAMP) models
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

demo: $(STAMP)
	@$(MAKE) --no-print-directory models || echo "(model download failed: the demo falls back to a random tiny model)"
	$(BIN)/python -m hardwire.demo --models $(HARDWIRE_MODELS)

bench: $(STAMP) models
	$(BIN)/python -m hardwire.bench --models $(HARDWIRE_MODELS)
	$(BIN)/python -m hardwire.bench --models $(HARDWIRE_MODELS) --fold layers=shared --out build/bench-shared

# extra hardwire synth options, e.g. SYNTH_ARGS="--seed 2" or "--nextpnr-args='--no-tmdriv'"
SYNTH_ARGS ?=

# stories260K at W8 with a 128-token context at 25 MHz: the search picks the layer-serial
# pe=1,simd=4 plan (85% of the block RAM); at 256 tokens the block RAM is 92% full and
# nextpnr does not route it (BENCHMARKS.md, FPGA)
synth: $(STAMP) models
	$(BIN)/hardwire synth $(HARDWIRE_MODELS)/stories260K.bin --board ulx3s-85f --seq-len 128 --clock-mhz 25 -o build/synth $(SYNTH_ARGS)

clean:
	rm -rf build .pytest_cache
