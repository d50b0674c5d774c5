"""The embedded demo: synthetic counting, a tiny Qwen2.5-VL-architecture policy from scratch, SFT then GRPO vs EKIPL.

python experiments/train.py --config configs/demo.py --config.stage=rl --config.rl.selection=none
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = "demo"  # run name, used in results tables
  c.workdir = "results/demo"  # checkpoints, metrics.jsonl, TensorBoard, predictions

  # Policy: a tiny Qwen2.5-VL (same code path as the 3B/7B models), initialised from scratch and saved as an HF folder.
  c.model.init_from = ""  # HF folder; empty: build `c.model.arch` from scratch
  c.model.family = "qwen2_5_vl"  # qwen2_vl | qwen2_5_vl
  c.model.arch = ml_collections.ConfigDict(
      dict(  # HF config fields of the from-scratch policy
          hidden_size=128,
          num_hidden_layers=4,
          num_attention_heads=4,
          num_key_value_heads=2,
          intermediate_size=384,
          vision_depth=2,
          vision_hidden_size=64,
          vision_num_heads=4,
          vision_intermediate_size=128,
          vision_window_size=112,
          vision_fullatt_block_indexes=(1,),
          max_position_embeddings=4096,
          rope_theta=10000.0,
          tie_word_embeddings=True,
          mrope_section=(4, 6, 6),
      )
  )
  c.model.vocab_size = 640  # BPE vocabulary trained on the synthetic corpus

  # Data: synthetic CLEVR-Math-like counting, generated offline from a seed.
  c.data.builder = "synthetic_reasoning"  # TFDS builder name: synthetic_reasoning | reason_rft_cot
  c.data.task = "counting"  # prompt template key and reward dispatch
  c.data.train_split = "train"  # RL / SFT training split
  c.data.eval_splits = ("test_id", "test_ood")  # evaluated periodically and at the end
  c.data.eval_scorer = "clevr-math"  # rewards.score() split rule used for synthetic splits
  c.data.num_train = 3000  # synthetic examples per split (train)
  c.data.num_test = 256  # synthetic examples per test split (all evaluated)
  c.data.synthetic_seed = 0  # generator seed (another seed gives fresh scenes: a validation set for tuning)
  c.data.teacher_blind = "gray"  # the objects the SFT teacher gets wrong (see ekipl_jax/data/synthetic.py)
  c.data.teacher_flaw = "uncounted"  # it lists them right but leaves them out of its running total and answer
  c.data.teacher_miss_rate = 0.9  # probability per training scene that it does so (tests stay truthful)
  c.data.question_kinds = ("count", "add", "subtract_n")  # no 'subtract_all' (its count of a shape / size filter is
  # perception this tiny policy does not learn in the SFT budget; the other kinds need the total only)
  c.data.ood_min_objects = 4  # test_ood: 4-7 objects (the training scenes 2-6) and every scene with a held-out
  c.data.ood_max_objects = 7  # colour-shape pair
  c.data.ood_held_out = "one"  # exactly one object per test_ood scene has a held-out pair (gray as often as in ID)
  c.data.image_size = 112  # pixels per side (8 x 8 patches of 14 px, 16 merged tokens)
  c.data.min_pixels = 112 * 112  # image processor bounds (keep images at their size)
  c.data.max_pixels = 112 * 112
  c.data.prompt_buckets = (96, 128, 192)  # left-padded prompt lengths (one compilation each)

  # SFT warm start on the scripted chain of thought.
  c.sft.steps = 300  # optimizer steps (~3 epochs; the colour lines are learned, the teacher's blind spot too)
  c.sft.batch_size = 32  # examples per step
  c.sft.lr = 2e-3  # peak learning rate (cosine, warm-up below)
  c.sft.warmup_steps = 30  # linear warm-up steps
  c.sft.max_completion = 128  # completion tokens kept (target + EOS; targets <= 123 with the demo's tokenizer)
  c.sft.num_examples = 3000  # the whole training split (1600 examples were memorised before the colours were learned)

  # RL: GRPO / EKIPL.
  c.rl.steps = 30  # RL steps (one update each, mu = 1)
  c.rl.batch_prompts = 8  # prompts per step (4 gave mostly zero-variance groups: a noisy update)
  c.rl.group_size = 8  # G kept per prompt
  c.rl.num_policy_samples = 8  # N policy samples per prompt
  c.rl.num_external_per_model = 1  # K responses per external model in the pool
  c.rl.selection = "ekipl"  # ekipl (top-G of the pool) | none (GRPO) | all | replace
  c.rl.beta = 0.0  # no reference model in the demo (KL coefficient 0)
  c.rl.optimizer.lr = 3e-5  # tiny from-scratch model (1e-4 and 2e-4 broke copying and arithmetic in our runs)
  c.rl.optimizer.warmup_steps = 0
  c.rl.sampling.max_new_tokens = 128  # completion budget (chains of thought <= 123 tokens)
  c.rl.sampling.temperature = 0.9  # sampling temperature for policy samples (Reason-RFT's RL: 0.9)

  c.aux.store = "results/demo/aux"  # aux store folder written by precompute_aux
  c.aux.sources = ("solver_strong", "solver_weak")  # scripted external models: perfect and 60%-accurate solvers

  c.eval.every = 10  # RL steps between evaluations
  c.eval.num_examples = 256  # examples per eval split
  c.eval.batch_size = 64  # one generation batch per split
  c.eval.max_new_tokens = 128  # the chain of thought has the same length for every scene
  c.data.data_dir = "results/tfds"  # TFDS folder for the generated dataset
  c.checkpoint.every = 10  # RL/SFT steps between checkpoints
  return c
