"""A text-only assistant LM for the `hf-assisted:DIR` peer (and the `draft-model` drafter): a small LLaMA sharing
the target's tokenizer, trained on the testbed's training text for a fixed wall-time budget.

It sees exactly what the target's tokenizer gives it, image placeholder tokens included (it cannot see the
pixels), and learns next-token prediction on the answers of the testbed training stream (training seeds only,
never the evaluation suites). Give it the same budget as the drafters it is compared with (`--minutes`).

    python -m vlmspec.bench.assistant --target testbed --out runs/text-assistant --minutes 20
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def image_token_count(target_dir: Path) -> int:
    """Image placeholder tokens the target's processor puts in a prompt for one image."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(target_dir)
    image_token = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                          "text": "x"}]}],
                                         add_generation_prompt=True, tokenize=False)
    ids = processor(images=[Image.new("RGB", (64, 64))], text=text, return_tensors="pt")["input_ids"][0]
    return int((ids == image_token).sum())


def train_text_assistant(out: str | Path, target: str | Path = "testbed", minutes: float = 10.0,
                         steps: int | None = None, seed: int = 0, hidden: int = 256, layers: int = 2,
                         batch_size: int = 16, lr: float = 1e-3, progress: bool = True) -> Path:
    """Train for `minutes` of wall time (or `steps` optimizer steps) and save a bf16 LlamaForCausalLM with the
    target's tokenizer in `out`; returns `out`."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vlmspec.target.base import resolve_target_path
    from vlmspec.testbed.train import Batches

    target_dir = resolve_target_path(target)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target_config = json.loads((target_dir / "config.json").read_text())
    max_positions = target_config.get("text_config", target_config).get("max_position_embeddings", 2048)
    n_image = image_token_count(target_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    batches = Batches(seed, batch_size, tokenizer, n_image, mix="base")   # the general testbed mixture
    budget = None if steps is not None else minutes * 60
    total = steps or 100_000
    started, step, ema = time.monotonic(), 0, None
    bar = tqdm(total=steps, desc="assistant", disable=not progress)
    while step < total and (budget is None or time.monotonic() - started < budget):
        batch = batches.get(step)
        for group in optimizer.param_groups:   # warm-up, then cosine over the step budget or a 2000-step horizon
            horizon = steps or 2000
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(
                1.0, step / horizon))))
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
    bar.close()
    batches.close()
    out = Path(out)
    model.to(torch.bfloat16).eval().save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "assistant.json").write_text(json.dumps({
        "target": str(target), "steps": step, "seconds": round(time.monotonic() - started, 1), "seed": seed,
        "hidden": hidden, "layers": layers, "batch_size": batch_size, "lr": lr, "final_loss_ema": ema,
        "image_tokens_per_image": n_image}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="testbed", help="target model directory or 'testbed'")
    parser.add_argument("--out", required=True, help="output folder (a loadable LlamaForCausalLM)")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps instead of a time budget")
    parser.add_argument("--seed", type=int, default=0, help="training seed (training stream, never eval seeds)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    out = train_text_assistant(args.out, args.target, args.minutes, args.steps, args.seed, args.hidden, args.layers)
    print(f"assistant saved to {out}; use it with: vlmspec bench --peers hf-assisted:{out} "
          f"(or --drafters draft-model --drafter-option draft-model:model={out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
