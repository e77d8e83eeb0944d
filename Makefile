# rscurate + rspretrain. `make help` lists the targets.
PYTHON   ?= python3.11
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
DEMO     ?= demo-out
# Multi-GPU / multi-node training (see README "Pretraining on many GPUs")
NNODES   ?= 1
NPROC    ?= 8
NODE_RANK ?= 0
RDZV     ?= localhost:29500
SHARDS   ?=
RUN      ?= runs/selectivemae-vitb
CONFIG   ?= configs/selectivemae_vitb_opticalrs13m.yaml
DATA_ROOT ?=
CURATED  ?= data/opticalrs
WORKERS  ?=
ALLOW_MISSING ?=

.DEFAULT_GOAL := help
.PHONY: help install chromium test demo lint bench bench-curation-scale bench-fidelity clean opticalrs-13m opticalrs-4m opticalrs-4m-release opticalrs-13m-release pretrain pretrain-vitb pretrain-vitl pretrain-vith pretrain-mae-vitb \
	bench-evaluation finetune-aid finetune-nwpu finetune-ucm finetune-eurosat eval-eurosat-cpu

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: these are the wheels the project is tested with
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install everything (torch pinned)

chromium:  ## install headless Chromium for the report's browser test (Debian, as root)
	@test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium is missing and we are not root: the browser test will skip (sudo apt-get install -y chromium)"

test: $(STAMP) chromium  ## run the test suite (real-imagery tests need RS_REAL_DATA)
	$(PY) -m pytest -q

demo: $(STAMP)  ## synthesize a corpus, curate it into shards, pretrain briefly on CPU, export, report, visualize, probe
	rm -rf $(DEMO)
	$(VENV)/bin/rscurate synth $(DEMO)/corpus
	$(VENV)/bin/rscurate run $(DEMO)/corpus/recipe.yaml --out $(DEMO)/curated
	$(VENV)/bin/rscurate verify $(DEMO)/curated
	$(VENV)/bin/rspretrain train --config configs/demo_cpu.yaml --shards '$(DEMO)/curated/shards/*.tar' --out $(DEMO)/run
	$(VENV)/bin/rspretrain export $(DEMO)/run --out $(DEMO)/encoder.safetensors
	$(VENV)/bin/rscurate report $(DEMO)/curated
	$(VENV)/bin/rspretrain visualize $(DEMO)/run --out $(DEMO)/reconstruction.png --n 6
	$(VENV)/bin/rspretrain probe $(DEMO)/encoder.safetensors --train $(DEMO)/corpus/scenes/train --val $(DEMO)/corpus/scenes/val
	$(VENV)/bin/rspretrain probe $(DEMO)/encoder.safetensors --random-init --train $(DEMO)/corpus/scenes/train --val $(DEMO)/corpus/scenes/val

bench: $(STAMP)  ## run the CPU benchmarks and rewrite docs/benchmarks.md
	$(PY) benchmarks/run_all.py --out docs/benchmarks.md

bench-curation-scale: $(STAMP)  ## curation scaling: 1 vs 2 workers on 30,000 chips + a 16000 px GeoTIFF, 4-worker model (~15 min)
	$(PY) benchmarks/run_all.py --out docs/benchmarks.md --only curation-scale

bench-fidelity: $(STAMP)  ## SelectiveMAE vs MAE at equal compute on EuroSAT (~2 h on 2 cores; RS_LABELED_DATA=...)
	@test -n "$(RS_LABELED_DATA)" || { echo "set RS_LABELED_DATA to the EuroSAT RGB folder (one sub-folder per class)"; exit 2; }
	$(PY) benchmarks/run_all.py --out docs/benchmarks.md --only fidelity

bench-evaluation: $(STAMP)  ## the three evaluation protocols on EuroSAT, demo encoder vs random init (~1 h; make demo first)
	@test -n "$(RS_LABELED_DATA)" || { echo "set RS_LABELED_DATA to the EuroSAT RGB folder (one sub-folder per class)"; exit 2; }
	$(PY) benchmarks/run_all.py --out docs/benchmarks.md --only evaluation

lint: $(STAMP)  ## ruff + mypy
	$(VENV)/bin/ruff check rscurate rspretrain tests benchmarks
	$(VENV)/bin/mypy rscurate rspretrain

CURATE = $(VENV)/bin/rscurate run $(1) --out $(CURATED) $(if $(WORKERS),--workers $(WORKERS)) $(if $(ALLOW_MISSING),--allow-missing)

opticalrs-13m: $(STAMP)  ## curate the OpticalRS-13M-style corpus: DATA_ROOT=... [CURATED=... ALLOW_MISSING=1]
	@test -n "$(DATA_ROOT)" || { echo "set DATA_ROOT to the folder holding the datasets (see manifests/README.md)"; exit 2; }
	DATA_ROOT=$(DATA_ROOT) $(call CURATE,manifests/opticalrs-13m.yaml)

opticalrs-4m: $(STAMP)  ## curate the smaller OpticalRS-4M-style subset: DATA_ROOT=... [CURATED=... ALLOW_MISSING=1]
	@test -n "$(DATA_ROOT)" || { echo "set DATA_ROOT to the folder holding the datasets (see manifests/README.md)"; exit 2; }
	DATA_ROOT=$(DATA_ROOT) $(call CURATE,manifests/opticalrs-4m.yaml)

RELEASE_CHECK = @test -n "$(DATA_ROOT)" || { echo "set DATA_ROOT to the folder holding OpticalRS-4M/ (or -13M/) and the benchmarks (see manifests/README.md)"; exit 2; }

opticalrs-4m-release: $(STAMP)  ## shard the released OpticalRS-4M split ZIP in DATA_ROOT/OpticalRS-4M, read in place [CURATED=...]
	$(RELEASE_CHECK)
	DATA_ROOT=$(DATA_ROOT) $(call CURATE,manifests/$@.yaml)

opticalrs-13m-release: $(STAMP)  ## the same for the released OpticalRS-13M (DATA_ROOT/OpticalRS-13M)
	$(RELEASE_CHECK)
	DATA_ROOT=$(DATA_ROOT) $(call CURATE,manifests/$@.yaml)

TORCHRUN = $(VENV)/bin/torchrun --nnodes=$(NNODES) --nproc_per_node=$(NPROC) --node_rank=$(NODE_RANK) \
	  --rdzv_backend=c10d --rdzv_endpoint=$(RDZV) -m rspretrain train

pretrain: $(STAMP)  ## torchrun pretraining: SHARDS=... CONFIG=... [NNODES NPROC NODE_RANK RDZV RUN]
	@test -n "$(SHARDS)" || { echo "set SHARDS='/data/opticalrs/shards/opticalrs-13m-{000000..012999}.tar' (or a URL pattern)"; exit 2; }
	$(TORCHRUN) --config $(CONFIG) --shards '$(SHARDS)' --out $(RUN) --device cuda --resume

pretrain-vitb: CONFIG = configs/selectivemae_vitb_opticalrs13m.yaml
pretrain-vitb: pretrain  ## SelectiveMAE ViT-B, the paper's recipe (8 GPUs per node)

pretrain-vitl: CONFIG = configs/selectivemae_vitl_opticalrs13m.yaml
pretrain-vitl: RUN = runs/selectivemae-vitl
pretrain-vitl: pretrain  ## SelectiveMAE ViT-L, the paper's recipe

pretrain-vith: CONFIG = configs/selectivemae_vith_opticalrs13m.yaml
pretrain-vith: RUN = runs/selectivemae-vith
pretrain-vith: pretrain  ## SelectiveMAE ViT-H/14 with FSDP and activation checkpointing

pretrain-mae-vitb: CONFIG = configs/mae_vitb_opticalrs13m.yaml
pretrain-mae-vitb: RUN = runs/mae-vitb
pretrain-mae-vitb: pretrain  ## MAE ViT-B baseline with the same data and schedule

# Evaluating an encoder on the scene-classification benchmarks (README "Evaluating an encoder").
# DATA_ROOT holds AID/, NWPU-RESISC45/, UCMerced_LandUse/, EuroSAT-RGB/ (or set AID_DIR etc.). REF_LISTS, the
# SelectiveMAE repository's Classification/ folder, makes AID and NWPU use the paper's own split files.
WEIGHTS   ?=
FT_CONFIG ?= configs/finetune_vitb_paper.yaml
EVAL_OUT  ?= runs/eval
REF_LISTS ?=
AID_DIR     ?= $(DATA_ROOT)/AID
NWPU_DIR    ?= $(DATA_ROOT)/NWPU-RESISC45
UCM_DIR     ?= $(DATA_ROOT)/UCMerced_LandUse
EUROSAT_DIR ?= $(DATA_ROOT)/EuroSAT-RGB

# $(1) protocol, $(2) dataset folder, $(3) the reference's list suffix (28_0), $(4) its list folder
define FINETUNE_PROTOCOL
	@test -d "$(2)" || { echo "$(2): no such folder; set DATA_ROOT to the folder holding the datasets (or AID_DIR, NWPU_DIR, UCM_DIR, EUROSAT_DIR)"; exit 2; }
	@test -n "$(WEIGHTS)" || { echo "set WEIGHTS to the encoder (.safetensors, run folder, MAE / SelectiveMAE .pth)"; exit 2; }
	$(if $(and $(REF_LISTS),$(3)),$(FINETUNE_REFERENCE),$(FINETUNE_OURS))
endef
FINETUNE_REFERENCE = $(VENV)/bin/rspretrain finetune $(WEIGHTS) -c $(FT_CONFIG) --out $(EVAL_OUT)/$(1) --resume \
	--data-root $(2) --train $(REF_LISTS)/$(4)/train_labels_$(3).txt --val $(REF_LISTS)/$(4)/valid_labels_$(3).txt
FINETUNE_OURS = $(VENV)/bin/rspretrain split $(2) --protocol $(1) --out $(EVAL_OUT)/splits/$(1) && \
	$(VENV)/bin/rspretrain finetune $(WEIGHTS) -c $(FT_CONFIG) --out $(EVAL_OUT)/$(1) --resume \
	--train $(EVAL_OUT)/splits/$(1)/train.txt --val $(EVAL_OUT)/splits/$(1)/val.txt

finetune-aid: $(STAMP)  ## fine-tune WEIGHTS on AID, TR 20% and 50%: DATA_ROOT=... WEIGHTS=... [REF_LISTS=...]
	$(call FINETUNE_PROTOCOL,aid-20,$(AID_DIR),28_0,AID)
	$(call FINETUNE_PROTOCOL,aid-50,$(AID_DIR),55_0,AID)

finetune-nwpu: $(STAMP)  ## fine-tune WEIGHTS on NWPU-RESISC45, TR 10% and 20%: DATA_ROOT=... WEIGHTS=...
	$(call FINETUNE_PROTOCOL,nwpu-10,$(NWPU_DIR),19_0,NWPU-RESISC45)
	$(call FINETUNE_PROTOCOL,nwpu-20,$(NWPU_DIR),28_0,NWPU-RESISC45)

finetune-ucm: $(STAMP)  ## fine-tune WEIGHTS on UC Merced, TR 50% and 80%: DATA_ROOT=... WEIGHTS=...
	$(call FINETUNE_PROTOCOL,ucm-50,$(UCM_DIR))
	$(call FINETUNE_PROTOCOL,ucm-80,$(UCM_DIR))

finetune-eurosat: $(STAMP)  ## fine-tune WEIGHTS on EuroSAT RGB, 80/20: DATA_ROOT=... WEIGHTS=...
	$(call FINETUNE_PROTOCOL,eurosat-80,$(EUROSAT_DIR))

eval-eurosat-cpu: $(STAMP)  ## CPU check of WEIGHTS: short fine-tune + MAE linear probe on 2,000 EuroSAT chips
	@test -n "$(WEIGHTS)" || { echo "set WEIGHTS (e.g. demo-out/encoder.safetensors after make demo)"; exit 2; }
	$(VENV)/bin/rspretrain split $(EUROSAT_DIR) --protocol eurosat-80 --max-per-class 200 --out $(EVAL_OUT)/splits/eurosat-200
	$(VENV)/bin/rspretrain finetune $(WEIGHTS) -c configs/finetune_eurosat_cpu.yaml --out $(EVAL_OUT)/ft-eurosat-cpu --resume \
	  --train $(EVAL_OUT)/splits/eurosat-200/train.txt --val $(EVAL_OUT)/splits/eurosat-200/val.txt
	$(VENV)/bin/rspretrain linprobe $(WEIGHTS) -c configs/linprobe_eurosat_cpu.yaml --out $(EVAL_OUT)/lp-eurosat-cpu --resume \
	  --train $(EVAL_OUT)/splits/eurosat-200/train.txt --val $(EVAL_OUT)/splits/eurosat-200/val.txt

clean:  ## remove the venv and demo outputs
	rm -rf $(VENV) $(DEMO)
