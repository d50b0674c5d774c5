"""Fields every experiment config has; each experiment in configs/ starts from here and overrides what it needs."""

import ml_collections

from ekipl_jax.rl import config as rl_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"  # run name
  c.workdir = "runs/base"  # checkpoints, metrics.jsonl, TensorBoard, predictions
  c.stage = "rl"  # sft | rl | eval
  c.seed = 0  # every random choice of the run derives from (seed, step)

  c.model = ml_collections.ConfigDict()
  c.model.init_from = ""  # local HF checkpoint folder (config.json + safetensors + processor)
  c.model.family = "qwen2_5_vl"  # qwen2_vl | qwen2_5_vl (only used when building from scratch)
  c.model.arch = ml_collections.ConfigDict()  # from-scratch architecture (HF config fields); empty: use init_from
  c.model.vocab_size = 0  # from-scratch tokenizer size (0: use init_from's tokenizer)
  c.model.param_dtype = "float32"  # parameter storage dtype: float32 | bfloat16
  c.model.compute_dtype = "float32"  # activation dtype: float32 | bfloat16 (Reason-RFT trains in bf16)
  c.model.remat = False  # rematerialise each decoder layer in the backward pass
  c.model.logprob_chunk = 256  # tokens per chunk when computing log-probs (no [B, T, V] logits)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
  c.mesh.rules = ()  # logical-axis overrides ((logical, mesh_axis), ...); () = defaults
  c.mesh.distributed = False  # start multi-host JAX (pods, GPU clusters; docs/GUIDE.md section 3);
  # one process when none of the three below is given and none detected
  c.mesh.coordinator_address = ""  # distributed: "host:port" of process 0 ("" = JAX detects it)
  c.mesh.num_processes = 0  # distributed: processes in the run (0 = JAX detects it)
  c.mesh.process_id = -1  # distributed: this process's index (-1 = JAX detects it)

  c.data = ml_collections.ConfigDict()
  c.data.builder = "reason_rft_cot"  # TFDS builder: reason_rft_cot | synthetic_reasoning
  c.data.builder_config = ""  # TFDS builder config (reason_rft_cot: counting | structure | spatial)
  c.data.data_dir = "~/tensorflow_datasets"  # where TFDS prepares the data
  c.data.manual_dir = ""  # the downloaded Reason-RFT-CoT-Dataset folder (reason_rft_cot only)
  c.data.task = "counting"  # prompt template and reward dispatch: counting | structure | spatial
  c.data.train_split = "train"  # training split
  c.data.eval_splits = ()  # evaluation splits
  c.data.eval_scorer = ""  # rewards.score() rule for synthetic splits ("" = from split name)
  c.data.num_train = 0  # synthetic only: examples in train
  c.data.num_test = 0  # synthetic only: examples per test split
  c.data.image_size = 0  # synthetic only: image side in pixels
  c.data.synthetic_seed = 0  # synthetic only: scene generator seed (another seed gives fresh scenes, e.g. for tuning)
  c.data.teacher_blind = ""  # synthetic only: objects the SFT teacher misses, e.g. "small cylinder" ("" = none)
  c.data.teacher_miss_rate = 0.0  # synthetic only: probability the teacher misses each such object (train split)
  c.data.teacher_flaw = "miss"  # synthetic only: "miss" (blind objects unseen) | "uncounted" (seen, left out of totals)
  c.data.ood_held_out = "some"  # synthetic only: held-out pairs per test_ood scene: "some" (1..n) | "one" (exactly 1)
  c.data.ood_min_objects = 0  # synthetic only: test_ood's fewest objects (0 = one more than the training scenes' 6)
  c.data.ood_max_objects = 9  # synthetic only: test_ood's most objects
  c.data.question_kinds = ()  # synthetic only: question kinds drawn, from synthetic.QUESTION_KINDS (() = all four)
  c.data.min_pixels = 3136  # image processor lower bound (Qwen default 56*56)
  c.data.max_pixels = 480000  # image processor upper bound (Reason-RFT RL uses 480000)
  c.data.prompt_buckets = (256, 512, 1024, 2048, 4096)  # left-padded prompt lengths; prompt up to 4096 tokens
  c.data.prompt_templates = ml_collections.ConfigDict()  # task -> template with {Question}; empty: Reason-RFT text

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 0  # optimizer steps (0: one epoch over num_examples)
  c.sft.num_examples = 1600  # Reason-RFT stage 1: 1.6k examples per task
  c.sft.batch_size = 16  # examples per step
  c.sft.micro_batches = 1  # gradient accumulation: the batch is split into this many micro-batches (exact;
  # must divide sft.batch_size; train/sft.py)
  c.sft.lr = 1e-5  # peak learning rate (Reason-RFT: 1e-5, cosine)
  c.sft.warmup_steps = 100  # linear warm-up (Reason-RFT: 100)
  c.sft.weight_decay = 0.1  # AdamW weight decay (Reason-RFT: 0.1)
  c.sft.grad_clip = 1.0  # global-norm clip
  c.sft.mu_dtype = "float32"  # AdamW first moment: float32 | bfloat16 (as rl.optimizer.mu_dtype)
  c.sft.max_completion = 1024  # completion tokens kept (chain of thought + answer + EOS)

  c.rl = rl_config.default()  # GRPO / EKIPL objective, selection and optimizer (ekipl_jax/rl/config.py)
  c.rl.steps = 1000  # RL steps
  c.rl.batch_prompts = 8  # prompts per step (each gives a group of G)
  c.rl.sampling = ml_collections.ConfigDict()
  c.rl.sampling.max_new_tokens = 512  # Reason-RFT: max completion 512
  c.rl.sampling.temperature = 0.9  # Reason-RFT: 0.9
  c.rl.sampling.top_p = 0.9  # Reason-RFT: 0.9
  c.rl.sampling.top_k = 50  # Reason-RFT: 50
  c.rl.rewards = (("accuracy", 1.0), ("format", 1.0))  # (registered reward, weight); Reason-RFT: accuracy + format

  c.aux = ml_collections.ConfigDict()
  c.aux.store = ""  # auxiliary trajectory store folder (experiments/precompute_aux.py)
  c.aux.sources = ()  # external model names to draw from, in source-id order (1..M)
  c.aux.behaviour_tokenizer = ""  # stored behaviour log-probs are used only if made with this tokenizer
  # (a name or path, as precompute_aux records it); "" = never
  c.aux.min_coverage = 1.0  # RL refuses to start unless each of aux.sources has responses for at least this share
  # of the training ids (1.0: all); an uncovered prompt gets no external response, i.e. trains as plain GRPO

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 100  # RL steps between evaluations (0: only at the end)
  c.eval.num_examples = 0  # examples per split (0: all)
  c.eval.batch_size = 32  # prompts per generation batch
  c.eval.temperature = 0.1  # Reason-RFT evaluation: temperature 0.1
  c.eval.top_p = 0.9  # Reason-RFT evaluation: top_p 0.9
  c.eval.top_k = 50  # Reason-RFT evaluation: top_k 50
  c.eval.max_new_tokens = 768  # Reason-RFT evaluation: 768 new tokens
  c.eval.pass_k = 1  # samples per question for Pass@K (1: plain accuracy)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100  # steps between orbax checkpoints
  c.checkpoint.keep = 2  # checkpoints kept
  c.log_every = 1  # steps between metric lines
  c.fail_at_step = -1  # testing only: raise at this step to exercise resume (-1: never)
  # Stop with an error after this many consecutive steps whose update was skipped because the loss or gradient was
  # not finite (SFT and RL; a skipped update leaves the weights unchanged). 0: never stop.
  c.max_consecutive_skips = 3
  # Resume although the config differs from workdir/config.json (the differing keys are printed and the old file
  # is kept as config.<time>.json). False: such a resume is refused.
  c.resume_changed = False
  return c
