"""Forward-cost profile of a target: c(k)/c(1) and the cost of a one-layer draft head.

c(k) is the median latency of one target forward on k new tokens against a KV cache holding a typical prompt
(DESIGN: measured in isolation, after warm-up; the k values are interleaved within each repeat so that load from
other processes on a shared CPU biases no k). The draft head is one `LlamaDecoderLayer` of the target's width
plus the embedding, final norm and an lm_head (an EAGLE-style head without its fusion layer), timed on one new
token against its own cache of the same length.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def _truncate(cache, length: int) -> None:
    """Drop cache entries past `length` (crop takes a negative count in recent transformers)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        try:
            cache.crop(-extra)
        except ValueError:  # older API: crop(max_length)
            cache.crop(length)


def _median_seconds(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure_costs(model_dir: Path, ks: tuple[int, ...] = tuple(range(1, 65)), repeats: int = 31, warmup: int = 3,
                  dtype: torch.dtype = torch.bfloat16, threads: int | None = None) -> dict:
    """c(k) for each k, c(k)/c(1), and the one-layer draft head's cost relative to c(1), against a cache of the
    first `vqa` evaluation prompt (image tokens included). c(k) is `vlmspec.bench.costs`' measurement."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaModel

    from vlmspec.bench.costs import measure_cost_samples
    from vlmspec.target import Target
    from vlmspec.testbed.data import SUITE_DEFAULTS, make_sample

    if threads is not None:
        torch.set_num_threads(threads)
    target = Target.from_pretrained(model_dir, dtype=dtype)
    sample = make_sample("vqa", SUITE_DEFAULTS["vqa"][1], 0)
    inputs = target.encode([r.image for r in sample.images], messages=sample.messages())
    prompt_len = inputs["input_ids"].shape[1]
    samples = measure_cost_samples(target, inputs, ks, repeats=repeats, warmup=warmup)
    ks = sorted(samples)
    c = {k: statistics.median(v) for k, v in samples.items()}
    c_min = {k: min(v) for k, v in samples.items()}  # the least-disturbed run, for a loaded machine
    model, vocab = target.model, target.vocab_size
    gen = torch.Generator().manual_seed(0)

    text_config = model.config.text_config
    draft_config = type(text_config).from_dict({**text_config.to_dict(), "num_hidden_layers": 1})
    draft = LlamaModel(draft_config).to(dtype).eval()
    draft_head = torch.nn.Linear(text_config.hidden_size, vocab, bias=False).to(dtype)
    draft_cache = DynamicCache(config=draft_config)
    draft(input_ids=torch.randint(0, vocab, (1, prompt_len), generator=gen), past_key_values=draft_cache,
          use_cache=True)
    one = torch.randint(0, vocab, (1, 1), generator=gen)

    def draft_forward():
        hidden = draft(input_ids=one, past_key_values=draft_cache, use_cache=True).last_hidden_state
        draft_head(hidden)
        _truncate(draft_cache, prompt_len)

    c_draft = _median_seconds(draft_forward, repeats, warmup)
    return {
        "prompt_len": prompt_len,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "c_seconds": {k: c[k] for k in ks},
        "c_ratio": {k: c[k] / c[ks[0]] for k in ks},
        "c_min_seconds": c_min,
        "c_min_ratio": {k: c_min[k] / c_min[ks[0]] for k in ks},
        "draft_head_seconds": c_draft,
        "draft_head_ratio": c_draft / c[ks[0]],
    }


def format_costs(result: dict, show: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)) -> str:
    rows = ["| k | c(k) ms (median) | c(k)/c(1) (median) | c(k)/c(1) (fastest run) |", "|---|---|---|---|"]
    for k in show:
        if k in result["c_seconds"]:
            rows.append(f"| {k} | {1e3 * result['c_seconds'][k]:.2f} | {result['c_ratio'][k]:.2f} | "
                        f"{result['c_min_ratio'][k]:.2f} |")
    rows.append(f"\none-layer draft head (1 token): {1e3 * result['draft_head_seconds']:.2f} ms = "
                f"{result['draft_head_ratio']:.3f} x c(1)  (prompt {result['prompt_len']} tokens, "
                f"{result['dtype']}, {result['threads']} thread(s))")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    from vlmspec.target.families import resolve_dtype

    # python -m vlmspec.testbed.costs MODEL_DIR [THREADS [DTYPE]]   (DTYPE: bf16, the default, fp32, fast, …)
    res = measure_costs(Path(sys.argv[1]), threads=int(sys.argv[2]) if len(sys.argv) > 2 else None,
                        dtype=resolve_dtype(sys.argv[3] if len(sys.argv) > 3 else "bf16"))
    print(format_costs(res))
    print(json.dumps(res))
