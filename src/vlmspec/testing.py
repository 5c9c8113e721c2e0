"""Tiny random-init VLMs of every supported family, built offline from configs.

Used by the tests and by the cost script: a real HF model class with a real tokenizer, processor and chat
template, saved to a directory like any checkpoint, so the loading path under test is the user's path.
`lm_head_scale` sharpens the logits of a random model (see DESIGN: flat logits make near-ties common).
"""

from __future__ import annotations

from pathlib import Path

import torch

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


FAMILIES = {"llava": _llava, "idefics3": _idefics3, "llama": _text_only}


def tiny_model(family: str = "llava", *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
               lm_head_scale: float = 1.0, tokenizer=None):
    """Return `(model, processor)` of a random-init model of `family` (fp32, eval mode)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    torch.manual_seed(seed)
    model, processor = FAMILIES[family](tokenizer, hidden, layers, heads)
    if lm_head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    return model.eval(), processor


def save_tiny_model(directory: str | Path, family: str = "llava", **kwargs) -> Path:
    """Build a tiny model with `tiny_model` and save it (weights + processor) as a loadable checkpoint."""
    directory = Path(directory)
    model, processor = tiny_model(family, **kwargs)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
