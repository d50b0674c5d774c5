"""Ablations of Vision-EKIPL around a paper config (configs/paper.py), one knob or several at a time.

    python experiments/train.py --config configs/ablations.py:[MODEL,TASK,]KNOB=VALUE[,KNOB=VALUE ...]

MODEL,TASK default to qwen2_vl_2b,counting; the starting point is configs/paper.py:MODEL,TASK,ekipl. Knobs:

  m=1|2|3          M external models: the first m of ("gpt-4o", "gemini-1.5-pro", "qwen2.5-vl-72b"); the third
                   is an assumption of ours (an open model served by vLLM / SGLang), the paper's setting is m=2
  k=INT            K stored responses read per external model per prompt (the store needs that many: --k=K)
  g=INT            G kept rows per prompt; also sets N = G policy samples (as the paper configs do)
  n=INT            N policy samples per prompt (applied after g)
  selection=S      a registered selection rule (ekipl_jax/rl/selection.py RULES): ekipl (top G of the pool) | none
                   (GRPO) | all (the whole pool, N + M*K rows) | replace (LUFFY: G - 1 policy rows and 1 external
                   row, reward-blind)
  treatment=T      a registered external-token treatment (ekipl_jax/rl/loss.py TREATMENTS): paper | luffy |
                   importance | importance_tis | rlplus

e.g. `--config configs/ablations.py:m=1`, `--config configs/ablations.py:qwen2_5_vl_3b,spatial,g=4,k=2`.
Only the named knobs change (a one-factor ablation); a knob's side settings are listed below.
  - treatment=luffy flips the external-token term only. LUFFY's own recipe also has mean-only advantages,
    Dr. GRPO aggregation, beta 0, an entropy bonus and 1 external of 8: add `--config.rl.adv_std=none
    --config.rl.aggregation=seq_mean_token_sum_norm --config.rl.beta=0 --config.rl.entropy_coef=0.001`
    and `selection=replace`.
  - treatment=importance (and importance_tis) needs the behaviour model's per-token log-probs in the store: API
    models (GPT-4o, Gemini) return none for our tokenizer, so their rows fall back to 'paper'. It sets the sources
    to one local external checkpoint (EXTERNAL_CHECKPOINT, written with `precompute_aux.py --source=checkpoint
    --dtype=bfloat16`, which samples on one device, so the model must fit one accelerator) and
    aux.behaviour_tokenizer to the string precompute_aux records (the absolute --checkpoint path). The log-probs
    are used for a row only when that string matches and the policy's tokenization of the text has the same length
    (sampling/groups.py), i.e. when the external model's tokenizer is the policy's (Qwen2-VL and Qwen2.5-VL
    Instruct ship the same Qwen2 tokenizer vocabulary; check yours).
"""

import ml_collections

from configs import paper
from ekipl_jax.rl import loss, selection

EXTERNAL_MODELS = paper.EXTERNAL_MODELS + ("qwen2.5-vl-72b",)  # m picks the first m
EXTERNAL_CHECKPOINT = "/checkpoints/Qwen2.5-VL-7B-Instruct"  # treatment=importance: absolute path, as recorded
IMPORTANCE_SOURCE = "Qwen2.5-VL-7B-Instruct"  # precompute_aux's default --name for that checkpoint (folder name)
KNOBS = ("m", "k", "g", "n", "selection", "treatment")
SELECTIONS = selection.RULES.names  # the registered selection rules
TREATMENTS = loss.TREATMENTS.names  # the registered external-token treatments

# One variant per knob value (the ablation grid a paper table would show); every one loads (tests/test_configs.py)
# and passes train/validate.py (tests/test_ablations.py). N < G needs a pool N + M*K >= G (EKIPL keeps G of it): with
# the paper's M = 2, K = 1 that is N >= G - 2, so the fewest policy samples at G = 8 is n=6 (a pool of exactly G: every
# external row kept); n=4 would need K = 2.
VARIANTS = (
    tuple(f"m={m}" for m in (1, 2, 3))
    + tuple(f"k={k}" for k in (1, 2, 4))
    + tuple(f"g={g}" for g in (4, 8, 16))
    + ("g=8,n=6", "g=8,n=16")
    + tuple(f"selection={s}" for s in SELECTIONS)
    + tuple(f"treatment={t}" for t in TREATMENTS)
)


def parse(arg: str) -> tuple[str, str, dict[str, str]]:
  """'MODEL,TASK,KNOB=VALUE,...' (MODEL,TASK optional) -> (model, task, {knob: value})."""
  plain, knobs = [], {}
  for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
    if "=" in part:
      key, value = part.split("=", 1)
      if key not in KNOBS:
        raise ValueError(f"configs/ablations.py: unknown knob {key!r} (knobs: {', '.join(KNOBS)})")
      knobs[key] = value
    else:
      plain.append(part)
  if plain and len(plain) != 2:
    raise ValueError(f"configs/ablations.py:{arg!r}: give MODEL,TASK together (or neither) before the knobs")
  model, task = plain or ("qwen2_vl_2b", "counting")
  paper.parse(f"{model},{task},ekipl")  # validates model and task
  return model, task, knobs


def get_config(arg: str = "m=2") -> ml_collections.ConfigDict:
  model, task, knobs = parse(arg)
  c = paper.get_config(f"{model},{task},ekipl")  # locked: only existing fields can be set
  suffix = "_".join(f"{k}{v}" for k, v in knobs.items())
  c.name = f"{c.name}_{suffix}" if suffix else c.name  # run name: the paper run's plus the knobs
  c.workdir = f"{paper.RUNS}/ablations/{c.name}"  # one workdir per variant

  if "m" in knobs:
    m = int(knobs["m"])
    if not 1 <= m <= len(EXTERNAL_MODELS):
      raise ValueError(f"configs/ablations.py: m={m} not in 1..{len(EXTERNAL_MODELS)}")
    c.aux.sources = EXTERNAL_MODELS[:m]  # external models in source-id order 1..m
  if "k" in knobs:
    c.rl.num_external_per_model = int(knobs["k"])  # K responses per external model in the pool
  if "g" in knobs:
    c.rl.group_size = int(knobs["g"])  # G rows per prompt in the update
    c.rl.num_policy_samples = int(knobs["g"])  # N = G policy samples
  if "n" in knobs:
    c.rl.num_policy_samples = int(knobs["n"])  # N policy samples (pool = N + M*K rows)
  if "selection" in knobs:
    if knobs["selection"] not in SELECTIONS:
      raise ValueError(f"configs/ablations.py: selection={knobs['selection']!r} not in {SELECTIONS}")
    c.rl.selection = knobs["selection"]  # a registered selection rule
    c.rl.num_replace = 1  # 'replace': 1 external row replaces 1 policy row (LUFFY: 1 of 8)
    if not selection.reads_store(c.rl.selection):  # plain GRPO reads no store
      c.aux.store, c.aux.sources = "", ()
  if "treatment" in knobs:
    if knobs["treatment"] not in TREATMENTS:
      raise ValueError(f"configs/ablations.py: treatment={knobs['treatment']!r} not in {TREATMENTS}")
    c.rl.external_treatment = knobs["treatment"]  # a registered treatment
    if loss.TREATMENTS.info[c.rl.external_treatment].get("needs_behaviour"):
      c.aux.sources = (IMPORTANCE_SOURCE,)  # a store source written by --source=checkpoint (has log-probs)
      c.aux.behaviour_tokenizer = EXTERNAL_CHECKPOINT  # must equal the behaviour_tokenizer recorded in the store
      c.rl.is_max = 2.0  # the cap C of the importance weight
  return c
