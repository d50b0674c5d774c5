"""Write the auxiliary (external-model) trajectory store that EKIPL training reads (ekipl_jax/data/aux_sources.py).

  python experiments/precompute_aux.py --source=SOURCE --store=DIR [--name=NAME] [--k=1] [--data.KEY=VALUE ...]

  --source=cot         the dataset's `cot` field as "<think>\\n{cot}\\n</think>\\n<answer>\\n{answer}\\n</answer>"
  --source=solver      synthetic data only: scripted solver, correct with probability --accuracy
  --source=checkpoint  a local HF checkpoint (--checkpoint=DIR, its own processor) through our sampler
  --source=openai      an OpenAI-compatible endpoint (--base_url, --model, key from the env var --api_key_env) through
                       the official `openai` client (pip install -e .[api]): OpenAI, Gemini
                       (--base_url=https://generativelanguage.googleapis.com/v1beta/openai/), vLLM / SGLang
                       (--base_url=http://host:8000/v1 --api_key_env=); empty or length-cut replies count as failed
                       (not stored, asked again on a rerun); --max_failures consecutive endpoint failures stop it

`--data.*` are the trainer's data keys (configs/base.py: builder, builder_config, data_dir, manual_dir, task, ...);
give the values the training config uses so the same dataset and ids are read. Responses are written for
--split (default data.train_split); ids of every other split of the dataset (and of data.eval_splits) are refused.
A rerun resumes: (id, source, sample) keys already in the store are skipped (no request is sent for them).
Writers of different --name's may fill one --store in parallel (one folder and lock per source); a second writer of
the same name is refused with an error naming the first (pid, host).
The summary is printed as JSON; the exit status is 1 when some responses failed, 2 when the endpoint failed
(--max_failures) or another process is writing the same source.

The demo's stores (configs/demo.py, sources solver_strong / solver_weak):
  python experiments/precompute_aux.py --source=solver --name=solver_strong --accuracy=1.0 \\
    --store=results/demo/aux --data.builder=synthetic_reasoning --data.num_train=3000 --data.num_test=200 \\
    --data.image_size=112
  (the same with --name=solver_weak --accuracy=0.6)
Reason-RFT counting with GPT-4o:
  OPENAI_API_KEY=... python experiments/precompute_aux.py --source=openai --model=gpt-4o \\
    --base_url=https://api.openai.com/v1 --k=1 --store=aux/counting --data.manual_dir=/data/Reason-RFT-CoT-Dataset \\
    --data.builder_config=counting
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import base

SOURCES = ("cot", "solver", "checkpoint", "openai")

_DATA = config_flags.DEFINE_config_dict("data", base.get_config().data, "the trainer's data keys")
_SOURCE = flags.DEFINE_enum("source", None, SOURCES, "where the responses come from")
_STORE = flags.DEFINE_string("store", None, "the store folder (created or resumed)")
_NAME = flags.DEFINE_string(
    "name",
    "",
    "source name in the store (default: dataset_cot, solver_acc<accuracy>, "
    "the checkpoint folder's name, the model name)",
)
_SPLIT = flags.DEFINE_string("split", "", "split to write responses for (default: data.train_split)")
_LIMIT = flags.DEFINE_integer("limit", 0, "only the first N examples of the split (0: all)")
_K = flags.DEFINE_integer("k", 1, "responses per example (solver, checkpoint, openai)")
_SEED = flags.DEFINE_integer("seed", 0, "solver / sampler seed; openai: sample s sends seed + s (if >= 0)")
_ACCURACY = flags.DEFINE_float("accuracy", 1.0, "solver: probability of a correct answer")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "checkpoint: HF folder (weights + processor files)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "checkpoint: weights / compute dtype")
_BATCH = flags.DEFINE_integer("batch_size", 8, "checkpoint: prompts per sampler call")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.9, "checkpoint / openai: sampling temperature")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "checkpoint / openai: nucleus mass")
_TOP_K = flags.DEFINE_integer("top_k", 50, "checkpoint: top-k (0: off)")
_MAX_TOKENS = flags.DEFINE_integer("max_new_tokens", 512, "checkpoint / openai: completion budget (max_tokens)")
_BASE_URL = flags.DEFINE_string("base_url", "", "openai: e.g. https://api.openai.com/v1 or http://host:8000/v1")
_MODEL = flags.DEFINE_string("model", "", "openai: model name sent in each request")
_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "openai: env var holding the key ('' = none)")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "openai: requests in flight at most")
_TIMEOUT = flags.DEFINE_float("timeout_s", 120.0, "openai: per-attempt timeout in seconds")
_RETRIES = flags.DEFINE_integer("max_retries", 5, "openai: retries on 408/409/429/5xx/timeouts")
_MAX_FAILURES = flags.DEFINE_integer(
    "max_failures",
    10,
    "openai: stop after this many consecutive requests failing on the endpoint (connection error, timeout, HTTP "
    "error other than 400/413/422); 0: never",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "openai: progress bar on stderr (done / failed / skipped)")


def refused_ids(builder, dcfg, split: str) -> set[str]:
  """Ids of every split except the training split, plus data.eval_splits (evaluation data never enters a store)."""
  from ekipl_jax.train import input_pipeline as data_lib

  splits = {s for s in builder.info.splits if s != dcfg.train_split} | set(dcfg.eval_splits)
  return {ex["id"] for s in sorted(splits) for ex in data_lib.first(data_lib.source(builder, s), 0)}


def dataset_name(builder, dcfg, split: str) -> str:
  """The file the examples come from (Reason-RFT) or the builder / config name (synthetic), for provenance."""
  from ekipl_jax.data import builders

  if dcfg.builder == "reason_rft_cot":
    task = dcfg.builder_config or dcfg.task
    return os.path.abspath(
        builders.json_path(os.path.expanduser(dcfg.manual_dir), split, builders.REASON_RFT_FILES[task][split])
    )
  return f"{builder.name}/{builder.builder_config.name}"


def run() -> dict:
  from ekipl_jax.data import aux_sources
  from ekipl_jax.train import input_pipeline as data_lib

  dcfg, source = _DATA.value, _SOURCE.value
  split = _SPLIT.value or dcfg.train_split
  builder = data_lib.prepare(dcfg)
  examples = data_lib.first(data_lib.source(builder, split), _LIMIT.value)
  refuse = refused_ids(builder, dcfg, split)
  templates = dcfg.prompt_templates.to_dict() or None
  store, k, seed = _STORE.value, _K.value, _SEED.value
  if source == "cot":
    return aux_sources.write_from_cot(
        examples,
        store,
        _NAME.value or "dataset_cot",
        dataset=dataset_name(builder, dcfg, split),
        split=split,
        refuse_ids=refuse,
    )
  if source == "solver":
    if dcfg.builder != "synthetic_reasoning":
      raise app.UsageError("--source=solver needs --data.builder=synthetic_reasoning (scene metadata)")
    return aux_sources.write_from_solver(
        examples, store, _NAME.value or f"solver_acc{_ACCURACY.value:g}", _ACCURACY.value, seed, k, refuse_ids=refuse
    )
  if source == "checkpoint":
    if not _CHECKPOINT.value:
      raise app.UsageError("--source=checkpoint needs --checkpoint=DIR")
    name = _NAME.value or os.path.basename(os.path.normpath(_CHECKPOINT.value))
    from ekipl_jax.sampling import checkpoint_source  # the sampler and the policy, for this source only

    return checkpoint_source.write_from_checkpoint(
        examples,
        store,
        name,
        _CHECKPOINT.value,
        k=k,
        temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value,
        top_k=_TOP_K.value,
        max_new_tokens=_MAX_TOKENS.value,
        batch_size=_BATCH.value,
        seed=seed,
        min_pixels=dcfg.min_pixels,
        max_pixels=dcfg.max_pixels,
        prompt_buckets=tuple(dcfg.prompt_buckets),
        templates=templates,
        dtype=_DTYPE.value,
        refuse_ids=refuse,
    )
  if not (_BASE_URL.value and _MODEL.value):
    raise app.UsageError("--source=openai needs --base_url and --model")
  endpoint = aux_sources.Endpoint(
      base_url=_BASE_URL.value,
      model=_MODEL.value,
      api_key_env=_KEY_ENV.value,
      concurrency=_CONCURRENCY.value,
      timeout_s=_TIMEOUT.value,
      max_retries=_RETRIES.value,
      max_failures=_MAX_FAILURES.value,
  )
  return aux_sources.write_from_openai(
      examples,
      store,
      _NAME.value or _MODEL.value,
      endpoint,
      k=k,
      temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value,
      max_tokens=_MAX_TOKENS.value,
      seed=seed if seed >= 0 else None,
      templates=templates,
      refuse_ids=refuse,
      progress=_PROGRESS.value,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ekipl_jax.data import aux_sources, aux_store

  try:
    summary = run()
  except (aux_sources.EndpointError, aux_store.AuxStoreLockedError) as e:  # one clear line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  for f in summary["failures"]:
    print(f"failed: {json.dumps(f)}", file=sys.stderr)
  print(json.dumps({k: v for k, v in summary.items() if k != "failures"}))
  return 1 if summary["failed"] else 0


if __name__ == "__main__":
  flags.mark_flags_as_required(["source", "store"])
  app.run(main)
