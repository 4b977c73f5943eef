"""miniworld/bases.py -- the mini world's "hub checkpoints": tiny, randomly initialised models
built offline with the real classes.

Every stage script of edit-r1 loads its models the way a user loads a hub model:

    processor = AutoProcessor.from_pretrained(path)            # the RRM (Qwen2.5-VL, paper Sec. 3)
    model = AutoModelForImageTextToText.from_pretrained(path)
    pipe = FluxKontextPipeline.from_pretrained(path)           # policy 1 for Flow-GRPO (Sec. 4)
    pipe = QwenImageEditPipeline.from_pretrained(path)         # policy 2 for Flow-GRPO

On GPUs `path` is a hub id (Qwen/Qwen2.5-VL-7B-Instruct, black-forest-labs/FLUX.1-Kontext-dev,
Qwen/Qwen-Image-Edit). In the mini world it is a folder written by this file: the same classes
and the same file layout, with configs shrunk to about a million parameters and tokenizers
trained on the world's text. The scripts therefore have one code path, and a CPU run exercises
the code a GPU run uses.

What this file deliberately does not do: teach the bases anything. Weights are random (seeded);
pretraining them on the world (perception for the RRM, drawing for the editors) is a later
step. The default sizes are chosen so that such a pretraining fits in 10-30 CPU minutes:
the RRM has ~1.6 M parameters, each editor's transformer ~0.74 M, and the VAEs (~0.25 M)
have 16 latent channels at 8x downsampling, like the real ones. Nothing here touches the
hub: every model is built from a config, every tokenizer trained on the given texts.

Run it (2 CPU cores: ~10 s; writes ~15 MB):
    python -m miniworld.bases --out_dir runs/bases                         # built-in corpus
    python -m miniworld.bases --out_dir runs/bases --corpus_file texts.txt # one text a line
    # from Python, with the world's own texts (the intended corpus):
    #   build_all("runs/bases", miniworld.text_corpus(), image_size=96)

Library traps met here (transformers 5.24, diffusers 0.42.1; see notes/LIBRARY-FACTS.md):
  * Tokenizers are trained with the backend (`tokenizers`) object that the transformers class
    itself builds, so training and use pre-tokenize identically; tokenizers 0.23 wants BPE
    merges as tuples.
  * Qwen2.5-VL's pixel budget is `size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`
    (the old min_pixels/max_pixels kwargs are deprecated). We set both to the image's area
    rounded to multiples of 28 px, so a 96 px image is always 84 x 84 = 3 x 3 = 9 tokens.
  * A random Qwen2.5-VL samples `<|image_pad|>` and the next forward fails ("Image features and
    image tokens do not match"): the saved generation_config suppresses every special token but
    the two end-of-turn tokens, so any `generate` call is safe.
  * FluxKontextPipeline resizes the condition image to ~1 MP unless called with
    `max_area=H*W, _auto_resize=False`.
  * QwenImageEditPipeline.__call__ always resizes the condition image to ~1024 x 1024
    (`calculate_dimensions(1024 * 1024, ratio)` is hard-coded), so `qwen_edit_at_area` swaps
    that one module-level function; and its text-encoder call omits `mm_token_type_ids`, so the
    prompt embeddings use 1-D positions under transformers 5.x: `qwen_edit_prompt_embeds`
    computes them with the multimodal (3-D) positions the model was built for.
"""
from __future__ import annotations

import contextlib
import json
import re
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                       FluxKontextPipeline, FluxTransformer2DModel, QwenImageEditPipeline,
                       QwenImageTransformer2DModel)
from tokenizers import pre_tokenizers, trainers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, GenerationConfig,
                          HfArgumentParser, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor, T5Config, T5EncoderModel, T5Tokenizer)

import common

# =========================================================================================
# A. Tokenizers
# =========================================================================================
# The special tokens of Qwen2.5-VL, in the hub tokenizer's order. They are appended after the
# BPE vocabulary (as in Qwen's, where they start at id 151643).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Tokens a generation may end with; every other special token is suppressed in generation.
QWEN_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

# A Qwen2.5-VL-style chat template in our own words. Each message becomes
#   <|im_start|>{role}\n{content}<|im_end|>\n
# where content is a string or a list of items: {"type": "text", "text": ...} is written as is,
# {"type": "image"} (also "image_url", as OpenAI-style clients send) becomes one image slot
# <|vision_start|><|image_pad|><|vision_end|> that the processor widens to the image's tokens,
# {"type": "video"} the same with <|video_pad|>. add_generation_prompt opens the assistant turn.
# Unlike Qwen's template it adds no default system message: our prompts bring their own.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] in ('image', 'image_url') -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}")

# A small built-in corpus for `python -m miniworld.bases` without --corpus_file (the world's
# own texts are better: pass them).
DEFAULT_CORPUS = [f"make the {c} {s} {v}" for c in ("red", "green", "blue", "yellow", "purple")
                  for s in ("circle", "square", "triangle")
                  for v in ("red", "green", "blue", "bigger", "smaller")] + [
    "remove the red circle", "add a blue square at the top left", "move the green triangle to the right",
    "a red circle at top left", "a blue square in the middle", "a yellow triangle at bottom right"]


def qwen_edit_template() -> str:
    """The prompt template QwenImageEditPipeline wraps around an instruction, read from the
    installed pipeline (it is set in __init__, which accepts None components)."""
    pipe = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                 processor=None, transformer=None)
    return pipe.prompt_template_encode


def prompt_texts() -> list[str]:
    """Every text our prompts put in front of a model: the common.py system prompts and message
    texts (all variants), a formatted principle list, an RRM answer, inspector and judge
    answers, and Qwen-Image-Edit's encoder template. The tokenizer is trained on these, so the
    fixed parts of every prompt cost few tokens (prompt tokens dominate CPU time)."""
    principles = [{"question": f"Is the {c} circle {a}?", "category": cat}
                  for c, a, cat in (("red", "blue", "follow"), ("green", "unchanged", "keep"),
                                    ("blue", "free of noise", "quality"))]
    instr = "make the red circle blue"
    msgs = [common.decompose_messages(instr, [{"instruction": instr, "principles": principles}]),
            common.inspector_messages(instr, principles, [common.format_rrm_output("ok", [1, 0, 1], 7)]),
            common.judge_sc_messages(instr), common.judge_pq_messages(), common.scalar_messages(instr)]
    msgs += [common.verify_messages(instr, principles, v) for v in common.VERIFY_SYSTEMS]
    texts = [item["text"] for m in msgs for turn in m for item in turn["content"] if item["type"] == "text"]
    texts += [common.format_rrm_output("The circle is red now. The square did not move.", [1, 1, 0], 7.5),
              '{"gold": [{"question": 1, "gold": 1, "reason": "the circle is blue"}]}',
              '```json\n{"reasoning": "the edit is clean", "score": [7, 8.5]}\n```',
              qwen_edit_template().format(instr)]
    return texts


def _train_backend(tokenizer, trainer, texts: list[str]) -> dict:
    """Train the `tokenizers` model inside a transformers tokenizer (its normalizer and
    pre-tokenizer stay as the class built them) and return the trained model as JSON."""
    backend = tokenizer.backend_tokenizer
    backend.train_from_iterator(texts, trainer=trainer)
    return json.loads(backend.to_str())["model"]


def _training_texts(corpus: list[str], prompt_weight: int) -> list[str]:
    """Corpus + prompt texts (x prompt_weight, so their words win merges over rare corpus
    words) + one line of all printable ASCII (every character gets a token: no unknowns in
    CLIP/T5). Texts are cut at Qwen's special tokens, as the tokenizer cuts them at use time."""
    texts = list(corpus) + prompt_texts() * prompt_weight + [string.printable]
    specials = "|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS)
    return [piece for t in texts for piece in re.split(specials, t) if piece]


def build_tokenizer(corpus: list[str], vocab_size: int = 2048, prompt_weight: int = 20) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer for the mini world, with Qwen2.5-VL's special tokens and
    a Qwen2.5-VL-style chat template (CHAT_TEMPLATE).

    vocab_size counts the 256 byte tokens and merges (the trainer stops early on a small
    corpus); the 14 special tokens come on top. eos is <|im_end|> and pad <|endoftext|>, as in
    Qwen2.5-VL-*-Instruct. Trained on `corpus` plus prompt_texts() (x prompt_weight), so, for
    instance, Qwen-Image-Edit's system prefix is 64 tokens, the number its pipeline drops.

    Example:
        >>> tok = build_tokenizer(["make the red circle blue"])
        >>> tok.convert_ids_to_tokens(tok("the red circle").input_ids)
        ['the', 'Ġred', 'Ġcircle']
    """
    # Qwen2Tokenizer() with no vocab builds the right backend: NFC, Qwen's split regex, byte level.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=_byte_alphabet(), special_tokens=[])
    model = _train_backend(Qwen2Tokenizer(), trainer, _training_texts(corpus, prompt_weight))
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                         eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _byte_alphabet() -> list[str]:
    return pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols of byte-level BPE


def build_clip_tokenizer(corpus: list[str], vocab_size: int = 1024, model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's lower-cased BPE with the '</w>' end-of-word suffix, trained on the corpus.
    FLUX.1 reads only CLIP's pooled output; 77 is CLIP's (and the pipeline's) text length."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=_byte_alphabet(), end_of_word_suffix="</w>",
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    model = _train_backend(CLIPTokenizer(), trainer, _training_texts(corpus, 1))
    vocab = dict(model["vocab"])
    # CLIP splits a word into characters and marks the last one with '</w>'; a final character
    # never seen at a word end would be unknown, so give every byte its '</w>' form.
    for ch in _byte_alphabet():
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]],
                         model_max_length=model_max_length)


def build_t5_tokenizer(corpus: list[str], vocab_size: int = 1024) -> T5Tokenizer:
    """T5's SentencePiece-style Unigram (pieces with log-probability scores), trained on the
    corpus. T5Tokenizer hard-codes <pad>=0, </s>=1, <unk>=2, so the trainer puts them first;
    extra_ids=0 drops the 100 span-corruption sentinels nobody uses here."""
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=False, unk_token="<unk>",
                                      special_tokens=["<pad>", "</s>", "<unk>"])
    model = _train_backend(T5Tokenizer(extra_ids=0), trainer, _training_texts(corpus, 1))
    return T5Tokenizer(vocab=[tuple(p) for p in model["vocab"]], extra_ids=0)


# =========================================================================================
# B. The RRM base: Qwen2.5-VL (paper Sec. 3; the RRM is Qwen2.5-VL-7B-Instruct)
# =========================================================================================
def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the special tokens generation must never produce (all but the end tokens)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS if t not in QWEN_END_TOKENS]


def qwen_vl_processor(tokenizer, image_size: int = 96, processor_cls=Qwen2_5_VLProcessor):
    """A real Qwen2.5-VL processor whose pixel budget turns an image_size x image_size image
    into round(image_size / 28)^2 merged tokens (96 px -> 84 x 84 -> 3 x 3 = 9 tokens).

    Qwen resizes to multiples of 28 px (patch 14 x merge 2) inside [min_pixels, max_pixels];
    setting both to the rounded area fixes the token count for square images of any size.
    The video processor is there because the processor class wants one; we never use video.
    """
    side = max(28, round(image_size / 28) * 28)
    size = {"shortest_edge": side * side, "longest_edge": side * side}
    return processor_cls(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tokenizer,
                         video_processor=Qwen2VLVideoProcessor(size=size), chat_template=CHAT_TEMPLATE)


def qwen_vl_model(tokenizer, seed: int = 0, hidden_size: int = 128, num_layers: int = 4,
                  num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 512,
                  vision_depth: int = 2, vision_hidden_size: int = 64, vision_heads: int = 4,
                  vision_intermediate_size: int = 256) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2_5_VLForConditionalGeneration sized for a CPU.

    Text: hidden_size, num_layers decoder layers, GQA with num_heads query / num_kv_heads KV
    heads. Vision: a vision_depth-block ViT (patch 14, 2x2 merge to one LLM token, temporal
    patch 2 as in Qwen) whose merger projects to hidden_size. M-RoPE splits each head's
    rotary frequencies between time, height and width; mrope_section must sum to head_dim/2
    and we keep Qwen's 2:3:3 proportion (7B: head_dim 128 -> [16, 24, 24]).
    """
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    half = hidden_size // num_heads // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope_section},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden_size, num_heads=vision_heads,
            intermediate_size=vision_intermediate_size, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=hidden_size,
            # Qwen alternates windowed and full attention; windows of 112 px cover a whole
            # mini-world image anyway. The last block attends globally, as in Qwen.
            window_size=112, fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Saved with the model, so every generate() (ours, TRL's, `transformers serve`) stops at
    # <|im_end|> and never samples a vision token, which would break the next forward pass.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids[t] for t in QWEN_END_TOKENS], suppress_tokens=vision_token_ids(tokenizer))
    return model


def build_rrm_base(out_dir: str | Path, corpus: list[str], image_size: int = 96,
                   tokenizer: Qwen2Tokenizer | None = None, seed: int = 0, **size) -> Path:
    """Write a tiny Qwen2.5-VL (model + Qwen2_5_VLProcessor) to out_dir; return the path.

    `size` goes to qwen_vl_model (hidden_size, num_layers, ...). Reload it as a hub model:
        processor = AutoProcessor.from_pretrained(out_dir)
        model = AutoModelForImageTextToText.from_pretrained(out_dir)
    """
    out_dir = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(corpus)
    processor = qwen_vl_processor(tokenizer, image_size)
    model = qwen_vl_model(tokenizer, seed=seed, **size)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# =========================================================================================
# C. FLUX.1-Kontext (policy 1): FluxTransformer2DModel + AutoencoderKL + CLIP + T5
# =========================================================================================
def build_kontext(out_dir: str | Path, corpus: list[str], image_size: int = 96, seed: int = 0,
                  num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 3,
                  head_dim: int = 32, text_dim: int = 64, vae_channels: tuple = (8, 16, 32, 32)) -> Path:
    """Write a tiny FluxKontextPipeline to out_dir; return the path.

    Transformer: num_layers double-stream + num_single_layers single-stream blocks of width
    num_heads * head_dim, input = 2x2-packed 16-channel latents (64 features), guidance
    embedding on (Kontext-dev is guidance-distilled); RoPE axes (index, h, w) sum to head_dim.
    VAE: AutoencoderKL, 16 latent channels, len(vae_channels) - 1 = 3 downsamplings (8x), no
    quant convs, as FLUX's; shift 0 / scale 1 until pretraining measures the latents.
    Text: CLIP (pooled vector, text_dim / 2 wide) and T5 v1.1 (token sequence, text_dim wide).

    Call it at the world's size (the defaults resize to ~1 MP):
        pipe(image=img, prompt=p, height=96, width=96, max_area=96 * 96, _auto_resize=False,
             max_sequence_length=64)   # T5 pads to max_sequence_length (default 512)
    """
    out_dir = Path(out_dir)
    clip_tok, t5_tok = build_clip_tokenizer(corpus), build_t5_tokenizer(corpus)
    torch.manual_seed(seed)
    # FLUX reads one pooled vector from CLIP (a global "style" signal); the instruction's
    # tokens reach the transformer through T5. So CLIP is kept smaller than T5.
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=text_dim // 2, intermediate_size=text_dim,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=clip_tok.model_max_length,
        projection_dim=text_dim // 2, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=text_dim, d_kv=text_dim // 4, d_ff=2 * text_dim, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim // 2, guidance_embeds=True, axes_dims_rope=_rope_axes(head_dim))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), layers_per_block=1,
        norm_num_groups=8, sample_size=image_size, scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False)
    # FLUX.1's scheduler config: dynamic shifting by sequence length, as on the hub.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                               text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE dims for the (index, height, width) axes, summing to head_dim, each even, in
    FLUX's 16:56:56 proportion (head_dim 32 -> (4, 14, 14))."""
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = head_dim - first
    h = rest // 2 // 2 * 2
    return (first, h, rest - h)


# =========================================================================================
# D. Qwen-Image-Edit (policy 2): QwenImageTransformer2DModel + AutoencoderKLQwenImage +
#    a Qwen2.5-VL text encoder
# =========================================================================================
def build_qwen_edit(out_dir: str | Path, corpus: list[str], image_size: int = 96,
                    tokenizer: Qwen2Tokenizer | None = None, seed: int = 0, num_layers: int = 2,
                    num_heads: int = 3, head_dim: int = 32, vae_base_dim: int = 8,
                    text_encoder_size: dict | None = None) -> Path:
    """Write a tiny QwenImageEditPipeline to out_dir; return the path.

    Transformer: num_layers MMDiT blocks of width num_heads * head_dim over 2x2-packed
    16-channel latents, conditioned on the text encoder's last hidden states
    (joint_attention_dim = the encoder's hidden size). VAE: AutoencoderKLQwenImage (a causal
    3-D conv VAE; images are 1-frame videos), z_dim 16, three downsamplings (8x), latent mean
    0 / std 1 until pretraining measures them. Text encoder: a Qwen2.5-VL like the RRM base,
    half its width by default (`text_encoder_size` goes to qwen_vl_model), with the RRM's
    tokenizer and pixel budget in the Qwen2VLProcessor class the hub repo uses.

    Call it at the world's size inside `qwen_edit_at_area` (the pipeline forces ~1 MP), with
    prompt embeddings from `qwen_edit_prompt_embeds` (the pipeline's own use 1-D positions).
    """
    out_dir = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(corpus)
    processor = qwen_vl_processor(tokenizer, image_size, processor_cls=Qwen2VLProcessor)
    # The encoder only has to read a short instruction and one image: half the RRM's width.
    text_encoder_size = text_encoder_size or dict(
        hidden_size=64, num_layers=2, intermediate_size=256, vision_hidden_size=32, vision_heads=2,
        vision_intermediate_size=128)
    text_encoder = qwen_vl_model(tokenizer, seed=seed, **text_encoder_size)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=num_heads, joint_attention_dim=text_encoder.config.text_config.hidden_size,
        guidance_embeds=False, axes_dims_rope=_rope_axes(head_dim))
    vae = AutoencoderKLQwenImage(base_dim=vae_base_dim, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 attn_scales=[], temperal_downsample=[False, True, True],
                                 latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    # Qwen-Image's scheduler config on the hub (dynamic shift, terminal sigma 0.02).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImageEditPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                 tokenizer=tokenizer, processor=processor, transformer=transformer)
    pipe.save_pretrained(out_dir)
    return out_dir


# qwen_edit_at_area and qwen_edit_prompt_embeds live in common.py (real runs need them too).
from common import qwen_edit_at_area, qwen_edit_prompt_embeds  # noqa: E402,F401


# =========================================================================================
# E. Build everything
# =========================================================================================
def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def safetensors_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors")) / 2**20


def build_all(out_dir: str | Path, corpus: list[str], image_size: int = 96, seed: int = 0) -> dict:
    """Build rrm_base, kontext_base and qwen_edit_base under out_dir (one tokenizer shared by
    the RRM and Qwen-Image-Edit's text encoder); print and return their paths and sizes."""
    out_dir = Path(out_dir)
    t0 = time.time()
    tokenizer = build_tokenizer(corpus)
    paths = {
        "rrm_base": build_rrm_base(out_dir / "rrm_base", corpus, image_size, tokenizer=tokenizer, seed=seed),
        "kontext_base": build_kontext(out_dir / "kontext_base", corpus, image_size, seed=seed),
        "qwen_edit_base": build_qwen_edit(out_dir / "qwen_edit_base", corpus, image_size,
                                          tokenizer=tokenizer, seed=seed),
    }
    sizes = {name: round(safetensors_mb(p), 2) for name, p in paths.items()}
    for name, p in paths.items():
        print(f"{name:15s} {sizes[name]:6.2f} MB safetensors  {p}")
    print(f"total           {sum(sizes.values()):6.2f} MB  (vocab {len(tokenizer)}, {time.time() - t0:.1f} s)")
    return {"paths": paths, "mb": sizes}


@dataclass
class Args:
    out_dir: str = field(default="runs/bases", metadata={"help": "where rrm_base/, kontext_base/, qwen_edit_base/ go"})
    corpus_file: str | None = field(default=None, metadata={
        "help": "a text file, one world text (instruction, caption, question) per line; default: a built-in corpus"})
    image_size: int = field(default=96, metadata={"help": "side of the world's square images, in pixels"})
    seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})


def main():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    corpus = DEFAULT_CORPUS
    if args.corpus_file:
        corpus = [line.strip() for line in Path(args.corpus_file).read_text().splitlines() if line.strip()]
    build_all(args.out_dir, corpus, args.image_size, args.seed)


if __name__ == "__main__":
    main()
