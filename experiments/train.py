"""Train: `python experiments/train.py --config configs/<x>.py [--config.key=value ...]`.

Stage `sft` (CoT-SFT warm start), `rl` (GRPO / EKIPL) or `eval`, as `--config.stage` says. A rerun with the same workdir
resumes from the latest checkpoint; a rerun with another config is refused (listing the differing keys) unless
`--config.resume_changed=True`, and a second run in a busy workdir is refused naming the first one's pid and host.
An unknown `--config.key` is an error (ml_collections config_flags); bad values are refused, naming the key, before
anything is loaded (ekipl_jax/train/validate.py). docs/GUIDE.md section 6: when things go wrong.
Several hosts: the same command on each, with `--config.mesh.distributed=True` (docs/GUIDE.md section 3).
"""

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)", lock_config=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
  from ekipl_jax import tpu_flags  # pylint: disable=g-import-not-at-top
  from ekipl_jax.train import trainer  # pylint: disable=g-import-not-at-top

  tpu_flags.apply()  # before JAX starts a TPU backend (ekipl_jax/tpu_flags.py)

  trainer.run(_CONFIG.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
