"""Sampler throughput: ekipl_jax.sampling.generate vs transformers `generate` (torch), same weights, same machine.

A ~40M-parameter Qwen2.5-VL (text: hidden 512, 8 layers, 8 heads, 2 kv heads, mlp 1536, vocab 8192; a 2-block
vision tower) is built by transformers with a fixed seed and saved; both sides load that folder. Batch 16 text
prompts of 64 tokens, 128 new tokens, sampling (temperature 0.9, top-p 0.9, top-k 50) with EOS disabled so every row
makes exactly 128 tokens. Tokens/s = batch * new tokens / wall time of one call (prefill included), median over
`repeats` calls after one warm-up call (compilation excluded). Also: XLA compilations during calls with other prompt
lengths after warm-up (they fall into the same length bucket, so the expected count is 0).

    python experiments/bench_sampler.py [--repeats 3]      # prints a JSON dict; `run(...)` returns it
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

CONFIG = dict(
    text_config=dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
    vision_config=dict(depth=2, hidden_size=128, out_hidden_size=512, intermediate_size=256, num_heads=4,
                       patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=112,
                       fullatt_block_indexes=[1], tokens_per_second=2),
    image_token_id=8000, video_token_id=8001, vision_start_token_id=8002, vision_end_token_id=8003,
    tie_word_embeddings=False)


def save_model(out_dir: str, seed: int = 0) -> str:
    import torch
    import transformers
    config = transformers.Qwen2_5_VLConfig(**CONFIG)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    path = os.path.join(out_dir, "qwen2_5_vl_40m")
    model.save_pretrained(path)
    return path


def _prompts(batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 7999, (batch, length)).astype(np.int64)
    return ids, np.ones_like(ids)


def bench_ours(path: str, ids, mask, new_tokens: int, repeats: int, sampling: dict) -> dict:
    import jax
    from ekipl_jax.models.checkpoint import load_pretrained
    from ekipl_jax.sampling import generate
    from ekipl_jax.sampling.generate import count_compilations

    model, params = load_pretrained(path)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def call(ids_, mask_, seed):
        out = generate(model, params, ids_, mask_, max_new_tokens=new_tokens, eos_token_ids=[],
                       rng=jax.random.key(seed), **sampling)
        return np.asarray(out.tokens)

    t = time.perf_counter()
    call(ids, mask, 0)
    warm_s = time.perf_counter() - t
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        tokens = call(ids, mask, i + 1)
        times.append(time.perf_counter() - t)
    assert tokens.shape == (ids.shape[0], new_tokens)
    with count_compilations() as n:
        for length in (40, 50, 57, 63):
            call(*_prompts(ids.shape[0], length, length), length)
    sec = statistics.median(times)
    return dict(ours_tokens_per_s=ids.shape[0] * new_tokens / sec, ours_s_per_call=sec,
                ours_first_call_s=warm_s, ours_compilations_after_warmup=n[0], params=int(n_params),
                jax_devices=str(jax.devices()))


def bench_transformers(path: str, ids, mask, new_tokens: int, repeats: int, sampling: dict) -> dict:
    import torch
    import transformers
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, eos_token_id=None,
              pad_token_id=0, **sampling)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)

    def call(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            return model.generate(input_ids=ids_t, attention_mask=mask_t, **kw)

    call(0)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        out = call(i + 1)
        times.append(time.perf_counter() - t)
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    sec = statistics.median(times)
    return dict(hf_tokens_per_s=ids.shape[0] * new_tokens / sec, hf_s_per_call=sec,
                torch_threads=torch.get_num_threads(), transformers=transformers.__version__)


def run(batch: int = 16, prompt_len: int = 64, new_tokens: int = 128, repeats: int = 3, seed: int = 0,
        model_dir: str | None = None) -> dict:
    """Both figures, their ratio (ours / transformers) and the compilation count after warm-up."""
    sampling = dict(temperature=0.9, top_p=0.9, top_k=50)
    ids, mask = _prompts(batch, prompt_len, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model_dir or tmp, seed)
        res = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, **sampling)
        res.update(bench_transformers(path, ids, mask, new_tokens, repeats, sampling))
        res.update(bench_ours(path, ids, mask, new_tokens, repeats, sampling))
    res["speedup"] = res["ours_tokens_per_s"] / res["hf_tokens_per_s"]
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    run(a.batch, a.prompt_len, a.new_tokens, a.repeats)
