"""A tiny random-weight model for front-end benchmarks: SmolLM2's config and
tokenizer cut to 1 layer and hidden size 64, served with LOAD_FORMAT=dummy (vLLM
makes random weights). The engine core then costs next to nothing per token, so
what a benchmark measures is the serving front end in front of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


def build(dest: Path) -> Path:
    """The tiny model's folder (config and tokenizer, no weights), made once."""
    from vllm_gateway.engine import default_model

    source = default_model.ensure()
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    # Two heads of 32: vLLM's CPU attention takes head sizes from 32 up.
    config.update(num_hidden_layers=1, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, dest / name)
    return dest


def build_vlm(dest: Path, image_size: int = 64, patch_size: int = 8) -> Path:
    """A tiny random-weight vision-language model's folder (no weights): Idefics3's
    architecture (SmolVLM's), a 1-layer vision tower over `image_size` pixels in
    `patch_size` patches, pixel-shuffled 2x2 into (image_size / patch_size / 2)^2
    prompt tokens per image, in front of the tiny text model; SmolLM2's tokenizer
    with Idefics3's image tokens, and Idefics3's image processor without tiling.
    Serve it with LOAD_FORMAT=dummy. (LLaVA's vLLM module imports Pixtral's, which
    needs torchvision: the CPU build here has none.)"""
    from transformers import AutoTokenizer, Idefics3Config, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    text = build(dest / "text")
    tokenizer = AutoTokenizer.from_pretrained(text)
    # Idefics3's processor adds the image tokens it needs; the tiling tags too.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<global-img>"] + [
        f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]})
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                       max_image_size={"longest_edge": image_size})
    tokens = (image_size // patch_size // 2) ** 2
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=tokens,
                                  chat_template=tokenizer.chat_template)
    text_config = LlamaConfig.from_pretrained(text)
    text_config.vocab_size = (len(processor.tokenizer) + 63) // 64 * 64
    config = Idefics3Config(
        text_config=text_config.to_dict(), scale_factor=2, image_token_id=processor.image_token_id,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        pad_token_id=text_config.pad_token_id)
    config.architectures = ["Idefics3ForConditionalGeneration"]
    config.save_pretrained(dest)
    processor.save_pretrained(dest)
    shutil.rmtree(dest / "text")
    return dest


def build_audio_lm(dest: Path) -> Path:
    """A tiny random-weight audio-language model's folder (no weights): Qwen2-Audio's
    architecture, a 1-layer Whisper-style encoder (128 mel bins) in front of a
    1-layer Qwen2 text model the size of the tiny text one; SmolLM2's tokenizer with
    Qwen2-Audio's audio tokens, and Whisper's feature extractor (16 kHz). A clip
    takes one prompt token per 40 ms. Serve it with LOAD_FORMAT=dummy."""
    from transformers import AutoTokenizer, Qwen2AudioConfig, Qwen2AudioProcessor, Qwen2Config
    from transformers import WhisperFeatureExtractor

    text = build(dest / "text")
    tokenizer = AutoTokenizer.from_pretrained(text)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]})
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                                    chat_template=tokenizer.chat_template)
    small = json.loads((text / "config.json").read_text())
    text_config = Qwen2Config(**{k: small[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "head_dim",
                                                        "bos_token_id", "eos_token_id", "max_position_embeddings")},
                              vocab_size=(len(tokenizer) + 63) // 64 * 64)
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128,
                          num_mel_bins=128),
        text_config=text_config.to_dict(), audio_token_index=processor.audio_token_id)
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    config.save_pretrained(dest)
    processor.save_pretrained(dest)
    shutil.rmtree(dest / "text")
    return dest

if __name__ == "__main__":
    print(build(Path("benchmarks/results/tiny-smollm2")))
    print(build_vlm(Path("benchmarks/results/tiny-vlm")))
    print(build_audio_lm(Path("benchmarks/results/tiny-audio")))
