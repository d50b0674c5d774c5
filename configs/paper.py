"""Paper configs: four Qwen-VL policies x the three Reason-RFT tasks x {CoT-SFT, GRPO, Vision-EKIPL}, one file.

    python experiments/train.py --config configs/paper.py:MODEL,TASK,METHOD [--config.key=value ...]

  MODEL   qwen2_vl_2b | qwen2_vl_7b | qwen2_5_vl_3b | qwen2_5_vl_7b
  TASK    counting | structure | spatial
  METHOD  sft    Reason-RFT stage 1: CoT-SFT on the first 1.6k training examples, from the downloaded Instruct model
          grpo   stage 2, plain GRPO (policy samples only), from the stage-1 output runs/MODEL_TASK_sft/hf
          ekipl  stage 2, Vision-EKIPL: the pool adds K stored responses of each external model, top G kept

e.g. `--config configs/paper.py:qwen2_vl_2b,counting,ekipl`. Reason-RFT's settings (docs/METHOD.md sect. 5: G = 8,
max completion 512, prompts up to 4096 tokens, lr 1e-6, beta 0.04 with k3, sampling temperature 0.9 / top_p 0.9 /
top_k 50, evaluation at temperature 0.1 with 768 new tokens, max_pixels 480000, SFT on 1.6k examples at lr 1e-5) are
the defaults of configs/base.py and ekipl_jax/rl/config.py; this file sets only what differs from them: the model,
task and method, bf16 compute, rematerialisation, the FSDP mesh, the data files, 16 prompts per step, the number of
steps, and the external models. Where the code or the hardware forces a difference from Reason-RFT it is said next
to the field: 16 prompts per step instead of 14; a constant learning rate where the HF Trainer decays linearly to 0
(ekipl_jax has constant | cosine); fp32 master weights with bf16 compute (an AdamW step of lr 1e-6 is below bf16
resolution; DeepSpeed bf16 keeps fp32 masters too).

Paths are relative placeholders: pass your own with --config.model.init_from, --config.data.manual_dir,
--config.aux.store, --config.workdir. The mesh uses every device as one FSDP axis; see docs/GUIDE.md for what is
and is not supported on a multi-host pod slice.
"""

import math

import ml_collections

from configs import base

MODELS = {  # name -> (family, Hugging Face repo of the Instruct model Reason-RFT starts from)
    "qwen2_vl_2b": ("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct"),
    "qwen2_vl_7b": ("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2_5_vl_3b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2_5_vl_7b": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
}
TASKS = ("counting", "structure", "spatial")
METHODS = ("sft", "grpo", "ekipl")

# Training-set sizes as the Reason-RFT-CoT file names give them (A3-Visual-Counting-train-35k, A2-Structure-
# Perception-train-4k5, A1-Spatial-Transformation-train-60k): nominal, not exact counts. After the dataset is
# prepared the exact number is builder.info.splits["train"].num_examples; if it differs, pass --config.rl.steps.
TRAIN_SIZES = {"counting": 35_000, "structure": 4_500, "spatial": 60_000}
EPOCHS = {"counting": 1, "structure": 5, "spatial": 1}  # Reason-RFT stage-2 num_train_epochs
EVAL_SPLITS = {
    "counting": ("test_id", "test_ood"),  # CLEVR-Math, Super-CLEVR
    "structure": ("test_id", "test_ood"),  # GeoMath, Geometry3K
    "spatial": ("test_id", "test_ood_left", "test_ood_right"),
}  # TRANCE, TRANCE-left, TRANCE-right
EXTERNAL_MODELS = ("gpt-4o", "gemini-1.5-pro")  # M = 2 external models (docs/METHOD.md sect. 2)
BATCH_PROMPTS = 16
CHECKPOINTS = "checkpoints"  # downloaded HF folders: checkpoints/Qwen2-VL-2B-Instruct, ...
RUNS = "runs"  # workdirs: runs/MODEL_TASK_METHOD
REASON_RFT_DIR = "data/Reason-RFT-CoT-Dataset"  # the downloaded dataset folder (train_jsons/, test_jsons/, images/)
AUX_STORES = "aux"  # aux/TASK: written by experiments/precompute_aux.py (docs/GUIDE.md)

VARIANTS = tuple(f"{m},{t},{x}" for m in MODELS for t in TASKS for x in METHODS)


def parse(arg: str) -> tuple[str, str, str]:
  parts = [p.strip() for p in (arg or "").split(",")]
  if len(parts) != 3 or parts[0] not in MODELS or parts[1] not in TASKS or parts[2] not in METHODS:
    raise ValueError(
        f"configs/paper.py:{arg!r}: expected MODEL,TASK,METHOD with MODEL in {sorted(MODELS)}, "
        f"TASK in {TASKS}, METHOD in {METHODS}"
    )
  return parts[0], parts[1], parts[2]


def rl_steps(task: str, batch_prompts: int = BATCH_PROMPTS) -> int:
  """Optimizer steps for Reason-RFT's epochs over the (nominal) training set, one batch of prompts per step."""
  return math.ceil(EPOCHS[task] * TRAIN_SIZES[task] / batch_prompts)


def get_config(arg: str = "qwen2_vl_2b,counting,ekipl") -> ml_collections.ConfigDict:
  model, task, method = parse(arg)
  family, hf_repo = MODELS[model]
  c = base.get_config()
  c.lock()  # only fields that configs/base.py defines may be set below (a typo raises)

  c.name = f"{model}_{task}_{method}"  # run name
  c.workdir = f"{RUNS}/{c.name}"  # checkpoints, metrics.jsonl, TensorBoard, hf/ (pods: a
  # path every host sees, e.g. a gcsfuse mount)
  c.stage = "sft" if method == "sft" else "rl"  # sft: Reason-RFT stage 1; rl: stage 2 (GRPO / EKIPL)

  # Policy. Stage 1 starts from the downloaded Instruct model (`huggingface-cli download REPO --local-dir ...`),
  # stage 2 from stage 1's exported HF folder. Master weights stay float32 (base.py) under bf16 compute.
  c.model.init_from = (
      f"{CHECKPOINTS}/{hf_repo.split('/')[1]}" if method == "sft" else f"{RUNS}/{model}_{task}_sft/hf"
  )  # local HF folder (weights + processor files)
  c.model.family = family  # qwen2_vl | qwen2_5_vl (read from config.json anyway)
  c.model.compute_dtype = "bfloat16"  # Reason-RFT: --bf16
  c.model.remat = True  # recompute each decoder layer in the backward pass
  # (prompts up to 4096 + 512 completion tokens)

  # Mesh: every device on the fsdp axis (parameters split along their embed dim, batch rows over all devices).
  # Use (D, -1, 1) to keep D data-parallel replicas of FSDP groups, (1, -1, T) for T-way tensor parallelism.
  c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
  c.mesh.distributed = True  # jax.distributed start-up on a multi-host slice (a
  # no-op on one process; docs/GUIDE.md)

  # Data: the local Reason-RFT-CoT-Dataset copy, one TFDS builder config per task.
  c.data.builder_config = task  # counting | structure | spatial
  c.data.manual_dir = REASON_RFT_DIR  # the downloaded dataset folder
  c.data.task = task  # prompt template and reward dispatch
  c.data.eval_splits = EVAL_SPLITS[task]  # the task's ID and OOD test splits

  # Stage 1: CoT-SFT (16 rows of prompt + 1024 completion tokens): 2B / 3B on v5e-8 in 2 micro-batches of 8 rows (1 row
  # per chip at a time), 7B on v5e-16 in one (1 row per chip; 2 per chip on v5p-8). Exact accumulation (train/sft.py).
  c.sft.micro_batches = 1 if model.endswith("7b") else 2
  c.sft.mu_dtype = "bfloat16" if model.endswith("7b") else "float32"  # AdamW's first moment: as rl.optimizer.mu_dtype

  # Stage 2: GRPO / EKIPL.
  c.rl.batch_prompts = BATCH_PROMPTS  # prompts per step. Reason-RFT: 7 GPUs x 1 x grad-accum 2
  # = 14; 16 so that 16 x G = 128 rows divide over
  # power-of-two meshes (a non-dividing batch axis is not
  # sharded, ekipl_jax/sharding.py)
  c.rl.steps = rl_steps(task)  # EPOCHS x TRAIN_SIZES / batch_prompts (counting 2188,
  # structure 1407, spatial 3750). The trainer draws from
  # the whole train split, the SFT examples included
  c.rl.selection = "ekipl" if method == "ekipl" else "none"  # ekipl: top G of the pool | none: GRPO
  c.rl.micro_batches = 16 if model == "qwen2_5_vl_3b" else 8  # update in micro-batches (exact accumulation): 8 of 16
  # rows: 2 rows per chip at a time on v5e-8 (2B), 1 on v5e-16 and 4 on v5p-8 (7B); 3B on v5e-8: 16 of 8 rows, 1 per
  # chip (with 8 its update step left 0.5% of the HBM free). For the HBM of those slices (make aot, docs/TPU_PLAN.md)
  c.rl.optimizer.mu_dtype = "bfloat16" if model.endswith("7b") else "float32"  # AdamW's first moment: bf16 for 7B
  # (on v5e-16 the update step went from 15.57 to 14.54 GiB per chip with it; docs/TPU_PLAN.md)
  c.rl.optimizer.total_steps = c.rl.steps  # length of a 'cosine' schedule, if switched to it
  # (the default 'constant': HF Trainer decays linearly to 0, ekipl_jax has constant | cosine)

  # External responses (EKIPL only): precomputed per training id by experiments/precompute_aux.py.
  c.aux.store = f"{AUX_STORES}/{task}" if method == "ekipl" else ""  # store folder ("" for GRPO / SFT)
  c.aux.sources = EXTERNAL_MODELS if method == "ekipl" else ()  # source names in the store, ids 1..M
  return c
