"""Tiny random-init VLMs of every supported family, built offline from configs.

Used by the tests and by the cost script: a real HF model class with a real tokenizer, processor and chat
template, saved to a directory like any checkpoint, so the loading path under test is the user's path.
`lm_head_scale` sharpens the logits of a random model (see DESIGN: flat logits make near-ties common).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from vlmspec.verify import Sampler

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<global-img>",
                  "<end_of_utterance>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_CORPUS = (
    "the cat sat on the mat . a red square and a blue circle are in the image . what color is the cat ? "
    "describe the image in detail . there are three green triangles at the top left . the answer is yes . "
    "one two three four five six seven eight nine ten . user assistant system hello world how are you"
).split(" . ")


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a tiny fixed corpus, with the special tokens every family needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"},
                                   chat_template=CHAT_TEMPLATE)


def _text_config(tokenizer, hidden: int, layers: int, heads: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def _llava(tokenizer, hidden: int, layers: int, heads: int):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**_text_config(
        tokenizer, hidden, layers, heads)).to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="full", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return model, processor


def _idefics3(tokenizer, hidden: int, layers: int, heads: int):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=LlamaConfig(**_text_config(
        tokenizer, hidden, layers, heads)).to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2, tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                             max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE)
    return model, processor


def _text_only(tokenizer, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_text_config(tokenizer, hidden, layers, heads))), tokenizer


QWEN_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer(tokenizer):
    """A copy of the shared tokenizer with Qwen's chat and vision tokens (the caller's tokenizer is not touched)."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(QWEN_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _qwen_vl(tokenizer, hidden: int, layers: int, heads: int, version: str):
    """Qwen2-VL / Qwen2.5-VL (`version` "2" / "2.5") with M-RoPE, a 2-layer vision tower and 8-pixel patches;
    the processor is the torchvision-free `QwenImageTextProcessor` (see target/qwen2_vl.py)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil)

    from vlmspec.target.qwen2_vl import QwenImageTextProcessor

    tokenizer = _qwen_tokenizer(tokenizer)
    half = hidden // heads // 2                            # rotary frequencies per head, split over (t, h, w)
    spatial = half * 3 // 8                                # Qwen's own proportion: [16, 24, 24] for 64
    text = dict(_text_config(tokenizer, hidden, layers, heads), rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * spatial, spatial, spatial]})
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, mlp_ratio=2, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=32, out_hidden_size=hidden, fullatt_block_indexes=[1])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    model = model_class(config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids))
    # 16-pixel merged patches; 256..4096 pixels: a 32x32 image gives 4 image tokens, 64x48 gives 12
    image_processor = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                               temporal_patch_size=2)
    return model, QwenImageTextProcessor(image_processor, tokenizer, QWEN_CHAT_TEMPLATE, "<|image_pad|>")


def _qwen2_vl(tokenizer, hidden: int, layers: int, heads: int):
    return _qwen_vl(tokenizer, hidden, layers, heads, "2")


def _qwen2_5_vl(tokenizer, hidden: int, layers: int, heads: int):
    return _qwen_vl(tokenizer, hidden, layers, heads, "2.5")


def _llava_next(tokenizer, hidden: int, layers: int, heads: int):
    """LLaVA-NeXT with 32-pixel tiles on a 2x2 pinpoint grid: the image-token count varies with the image shape."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**_text_config(
        tokenizer, hidden, layers, heads)).to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        image_seq_length=16)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    return model, processor


FAMILIES = {"llava": _llava, "idefics3": _idefics3, "llama": _text_only, "qwen2_vl": _qwen2_vl,
            "qwen2_5_vl": _qwen2_5_vl, "llava_next": _llava_next}


def tiny_model(family: str = "llava", *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
               lm_head_scale: float = 1.0, attention_scale: float = 1.0, tokenizer=None):
    """Return `(model, processor)` of a random-init model of `family` (fp32, eval mode).

    `attention_scale` multiplies the text layers' query/key weights: random attention is nearly uniform, which
    hides position and mask bugs; sharper attention makes tests see them."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    torch.manual_seed(seed)
    model, processor = FAMILIES[family](tokenizer, hidden, layers, heads)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")) and "vision" not in name:
                parameter.mul_(attention_scale)
    return model.eval(), processor


def save_tiny_model(directory: str | Path, family: str = "llava", **kwargs) -> Path:
    """Build a tiny model with `tiny_model` and save it (weights + processor) as a loadable checkpoint."""
    directory = Path(directory)
    model, processor = tiny_model(family, **kwargs)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def random_image(generator: random.Random, min_side: int = 16, max_side: int = 64):
    """A random RGB noise image of random size."""
    import numpy as np
    from PIL import Image

    width, height = generator.randint(min_side, max_side), generator.randint(min_side, max_side)
    pixels = np.random.default_rng(generator.randint(0, 1 << 30)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@torch.no_grad()
def compare_greedy(model, inputs: dict, ours: list[int], reference: list[int], margin: float = 1e-4,
                   sampler: Sampler | None = None) -> str:
    """Classify an fp32 comparison as DESIGN defines it: 'equal'; 'near-tie' when the first differing position has
    a top-2 margin under `margin` (a k-token vs 1-token rounding flip is excused); else 'different'. The margin is
    of the logits, or with `sampler` (a seeded sampled request's) of the scores it chooses by."""
    if ours == reference:
        return "equal"
    first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
    prefix = torch.tensor([reference[:first]], dtype=torch.long, device=inputs["input_ids"].device)
    kwargs = dict(inputs)
    kwargs["input_ids"] = torch.cat([inputs["input_ids"], prefix], dim=1)
    kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    if "mm_token_type_ids" in inputs:
        kwargs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(prefix)], dim=1)
    logits = model(**kwargs).logits[0, -1:].float()                      # [1, V]
    if sampler is not None:
        logits = sampler.scores(logits, [first])
    top2 = logits[0].topk(2).values
    return "near-tie" if float(top2[0] - top2[1]) < margin else "different"
