"""The testbed architecture: a standard `LlavaForConditionalGeneration` with its tokenizer and processor.

- vision: CLIP ViT, 128 x 128 images, 16 x 16 patches -> 64 image tokens (the CLS token is dropped by the
  `default` feature-select strategy, `num_additional_image_tokens=1` tells the processor so);
- language: LLaMA, deep and narrow (16 layers of width 256), so a one-layer draft is cheap next to a forward;
- tokenizer: byte-level BPE trained with `tokenizers` on the generated corpus, with a small Jinja chat template
  over HF messages (`{"type": "image"}` parts become `<image>`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

try:  # transformers >= 5.2x: the PIL backend needs no torchvision
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # older 5.x: the class of this name has the same settings
    from transformers import CLIPImageProcessor as _ImageProcessor

from vlmspec.testbed import render
from vlmspec.testbed.data import EVAL_SEED_START, training_sample

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", IMAGE_TOKEN)
# Answers follow "ASSISTANT:" after one space and end with eos; training tokenizes the same pieces.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{{ '\\n' }}"
    "{% elif message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 16
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 768
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 768
    max_positions: int = 512


TINY = ArchConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                  intermediate_size=128, vision_hidden=32, vision_layers=1, vision_heads=2,
                  vision_intermediate=64)


def corpus(n: int = 6000, seed: int = EVAL_SEED_START - 1) -> list[str]:
    """Text the BPE is trained on: training-stream questions and answers plus the chat scaffolding."""
    texts = []
    for i in range(n):
        s = training_sample(seed, i)
        texts.append(f"USER: {s.question}\nASSISTANT: {s.answer}")
    return texts


def train_tokenizer(vocab_size: int, texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = _ImageProcessor(
        size={"shortest_edge": render.IMAGE_SIZE},
        crop_size={"height": render.IMAGE_SIZE, "width": render.IMAGE_SIZE},
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=render.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_config(arch: ArchConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
                              num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
                              image_size=render.IMAGE_SIZE, patch_size=render.PATCH, projection_dim=arch.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                       num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                       intermediate_size=arch.intermediate_size, max_position_embeddings=arch.max_positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", image_seq_length=render.GRID * render.GRID)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def build_model(arch: ArchConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration(build_config(arch, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def arch_dict(arch: ArchConfig) -> dict:
    return asdict(arch)
