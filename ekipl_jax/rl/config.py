"""RL config: GRPO / Vision-EKIPL group formation, advantages, loss and optimizer. Defaults follow Reason-RFT."""

import ml_collections
from ml_collections import config_dict


def default() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # --- group formation (selection.py) ---
  c.group_size = 8  # G: rows per prompt that enter the update (Reason-RFT: 8)
  c.num_policy_samples = 8  # N: policy samples drawn per prompt into the pool
  c.num_external_per_model = 1  # K: responses read from each external model per prompt
  c.selection = "ekipl"  # 'ekipl' top-G by reward | 'none' policy only (GRPO) | 'all' whole pool | 'replace' (LUFFY)
  c.num_replace = 1  # 'replace': k external rows replace k policy rows (LUFFY: 1 of 8)
  # --- advantages (advantages.py) ---
  c.adv_std = "group"  # 'group' per-group std | 'batch' one std over the batch | 'none' no division (Dr. GRPO)
  c.adv_stats_from = "all"  # 'all' rows of the group | 'policy' policy rows only (LUFFY grpo_split)
  c.adv_eps = 1e-4  # A = (r - mean) / (std + eps) (Reason-RFT / TRL: 1e-4)
  c.adv_ddof = 1  # 1: unbiased std, as torch .std() in TRL / Reason-RFT; 0: population std
  # --- loss (loss.py) ---
  c.eps_low = 0.2  # clip rho below at 1 - eps_low
  c.eps_high = 0.2  # clip rho above at 1 + eps_high (DAPO clip-higher: eps_high > eps_low)
  c.dual_clip = config_dict.placeholder(float)  # c > 1: for A < 0 bound the objective below by c * A (None = off)
  c.beta = 0.04  # KL coefficient to the frozen reference (0 = no reference log-probs needed)
  c.kl_estimator = "k3"  # 'k3' exp(ref - logp) - (ref - logp) - 1 | 'k1' logp - ref
  c.aggregation = (
      "seq_mean_token_mean"  # 'token_mean' (DAPO) | 'seq_mean_token_mean' (GRPO) | 'seq_mean_token_sum_norm' (Dr. GRPO)
  )
  c.max_len_norm = 512  # constant divisor of 'seq_mean_token_sum_norm' (max completion length)
  c.external_treatment = "paper"  # external tokens: 'paper' | 'luffy' | 'importance' | 'importance_tis' | 'rlplus'
  c.luffy_gamma = 0.1  # 'luffy': f(pi) = pi / (pi + gamma)
  c.is_max = 2.0  # cap C: 'importance' min(pi_theta / pi_behaviour, C); 'importance_tis' min(pi_old / pi_behaviour, C)
  c.entropy_coef = 0.0  # entropy bonus coefficient (LUFFY: 0.001)
  # T of the loss's log-probs log softmax(logits / T) (policy, pi_old, reference). None: the sampling temperature
  # (TRL's GRPOTrainer; then pi_old of a policy row is the distribution it was sampled from). Reason-RFT: 1.0.
  c.logprob_temperature = config_dict.placeholder(float)
  # --- update step (update.py) ---
  c.mu = 1  # inner epochs over one batch (Reason-RFT: 1, so rho == 1)
  c.micro_batches = 1  # gradient accumulation: the batch is split into this many micro-batches (exact)
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-6  # peak learning rate (Reason-RFT GRPO: 1e-6)
  c.optimizer.schedule = "constant"  # 'constant' (linear warm-up, then constant) | 'cosine' (warm-up, cosine decay)
  c.optimizer.warmup_steps = 0  # linear warm-up steps from 0 to lr
  c.optimizer.total_steps = 1000  # 'cosine': optimizer updates until the end of the decay
  c.optimizer.final_lr_ratio = 0.0  # 'cosine': final lr = lr * this
  c.optimizer.weight_decay = 0.0  # AdamW decoupled weight decay (HF Trainer default 0.0)
  c.optimizer.b1 = 0.9  # AdamW beta1
  c.optimizer.b2 = 0.999  # AdamW beta2 (HF Trainer default)
  c.optimizer.eps = 1e-8  # AdamW epsilon
  c.optimizer.grad_clip = 1.0  # global-norm gradient clipping (None or <= 0 = off)
  c.optimizer.mu_dtype = "float32"  # AdamW first moment: float32 | bfloat16 (half its HBM; 7B on v5e-16)
  return c
