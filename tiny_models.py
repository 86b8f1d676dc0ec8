"""The model name ``tiny``: architecture-faithful tiny versions of the defender (Qwen2.5-VL, with a
locally trained byte-level BPE carrying the Qwen special tokens and chat template) and of the attacker
(a Qwen-Image-Edit pipeline: 2-block MMDiT, small Qwen-Image VAE, the tiny Qwen2.5-VL as text encoder),
built offline and deterministically: the same weights in every process and stage. The weights are
random: they exercise every code path of the stages, but they do not solve the synthetic task
(tiny_world.py trains models of these architectures that do).

common.load_defender("tiny") / editing.load_attacker("tiny") call these under fixed seeds (so every process
builds the same weights); tiny_world.py builds its models from the same parts. It imports no project module.
"""


from __future__ import annotations

import json

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The Qwen2-VL chat template (as shipped with Qwen2.5-VL-7B-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tiny BPE is trained on: the prompts this project sends, so they tokenize compactly.
_TINY_CORPUS = [
    "You are a helpful assistant. Yes No yes no A B C D (A) (B) answer Answer \\boxed{A} "
    "\\boxed{B} \\boxed{C} \\boxed{D} \\boxed{Yes} \\boxed{No} 0 1 2 3 4 5 6 7 8 9 [ ] { } , . : \"",
    "Please answer the following question with only 'Yes' or 'No'. Answer with \\boxed{Yes} or "
    "\\boxed{No}. Options: Provide your final answer in the format \\boxed{X}, where X is the "
    "letter of your choice.",
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. "
    "Generate a new image that meets the user's requirements while maintaining consistency with "
    "the original input where appropriate.",
    "Add a plausible distractor object to mislead a model answering: Is the red circle on the "
    "left or right of the blue square? Is there a green triangle in the image? above below "
    "object bbox small wooden clock cup lamp bottle cell phone",
    "Does this image show one coherent scene in which the question can still be answered? Is "
    "there more than one in this image? Does this image look like a single natural photograph? "
    "Extend the scene naturally beyond its borders. Propose distractor objects as JSON.",
]


def build_tiny_tokenizer(extra_corpus=(), sentences=()):
    """Byte-level BPE (Qwen's pre-tokenizer) trained on a fixed corpus (+ ``extra_corpus``: the tiny world
    passes the stages' wordings), then ``sentences`` as added tokens (one token each, matched before the
    BPE): deterministic, offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=768, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((_TINY_CORPUS + list(extra_corpus)) * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, errors="replace",
                         additional_special_tokens=QWEN_SPECIAL_TOKENS[1:])
    tok.add_tokens(list(sentences))
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def tiny_vl_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, extra_corpus=(), sentences=()):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    tok = build_tiny_tokenizer(extra_corpus, sentences)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size)
    video_processor = Qwen2VLVideoProcessor(size=size)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                               video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def tiny_vl_config(tok, hidden=64, layers=2, vision_hidden=32, vision_heads=2, rope_theta=1e6):
    """Qwen2.5-VL config: 4 text heads (2 KV heads), vision patch 14 merged 2 x 2 as the real one."""
    from transformers import Qwen2_5_VLConfig
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    half = hidden // 8   # head_dim / 2 rotary pairs, split (temporal, height, width) as Qwen's 16/24/24
    mrope = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2 if hidden == 64 else hidden * 4,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=vision_heads,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  out_hidden_size=hidden, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


def build_tiny_defender():
    """A 2-layer Qwen2.5-VL (with vision tower) and its processor; weights from the global RNG (the
    caller seeds it: common.load_defender("tiny"))."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    processor = tiny_vl_processor()
    config = tiny_vl_config(processor.tokenizer)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.eval(), processor


def build_tiny_attacker(text_encoder, processor):
    """A Qwen-Image-Edit pipeline with a 2-block MMDiT, a small Qwen-Image VAE and the tiny VL as its text
    encoder; weights from the global RNG (the caller seeds it: editing.load_attacker("tiny"))."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(8, 12, 12))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    return QwenImageEditPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder,
                                 tokenizer=processor.tokenizer, processor=processor,
                                 transformer=transformer)


# Qwen-Image's released scheduler config.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
    use_dynamic_shifting=True)
