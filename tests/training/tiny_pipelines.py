"""Tiny, randomly initialised diffusers/transformers checkpoints written to a folder, fully offline.

They use the same on-disk formats as the real SD3.5 / FLUX.1 / PickScore / LAION-aesthetic checkpoints,
so tests (and the study) load them through exactly the code path a user's local folder takes.
Tokenizers are built from locally written vocabularies (no hub access):
- CLIP: a byte-level BPE vocabulary of the 256 byte symbols, their ``</w>`` forms and the two special
  tokens, with a merges file holding only its version line (every character is one token).
- T5: a ``tokenizers`` Unigram model over printable characters plus ``<pad>``, ``</s>``, ``<unk>``.

Usage: ``save_tiny_sd3_pipeline(tmp_path / "sd3")`` returns the folder, ready for ``from_pretrained``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 16  # tokenizer model_max_length == text model max_position_embeddings
T5_MAX_LENGTH = 16


def write_clip_tokenizer(folder: str | Path, max_length: int = CLIP_MAX_LENGTH):
    """Writes vocab.json/merges.txt and returns a CLIPTokenizer over them (one token per character)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def make_t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A T5 tokenizer over a character-level Unigram model (model_max_length must be set explicitly)."""
    from tokenizers import Tokenizer, models
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()] + [" ", "\u2581"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    return T5TokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, pad_token="<pad>", eos_token="</s>",
        unk_token="<unk>", extra_ids=0,
    )


def _clip_text_config(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection,
        # the pooled output is read at the first eos token: the ids must be this tokenizer's
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def save_tiny_sd3_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline (SD3.5-style transformer, 2 CLIP + T5, 4-channel VAE) saved to ``folder``.

    Shapes: CLIP hidden 16 x 2 -> 32 = T5 d_model = joint_attention_dim; pooled 16 x 2 = 32; images
    32x32 -> latents [4, 16, 16] (the VAE downsamples by 2).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        tokenizer_3 = make_t5_tokenizer()
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32, dual_attention_layers=(0,),
                qk_norm="rms_norm",
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_vae(4, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=CLIPTextModelWithProjection(_clip_text_config(tokenizer, 16, 16)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer, 16, 16)),
            tokenizer_2=tokenizer,
            text_encoder_3=_t5_encoder(tokenizer_3, 32),
            tokenizer_3=tokenizer_3,
        )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_flux_pipeline(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline (CLIP pooled 32 + T5 d_model 32, 4-channel VAE, packed 2x2 -> 16 channels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        tokenizer_2 = make_t5_tokenizer()
        pipe = FluxPipeline(
            transformer=FluxTransformer2DModel(
                patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(
                shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
            ),
            vae=_tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=CLIPTextModel(_clip_text_config(tokenizer, 32, 32)),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(tokenizer_2, 32),
            tokenizer_2=tokenizer_2,
        )
    pipe.save_pretrained(folder)
    return folder


def save_tiny_clip_scorer(folder: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """A CLIPModel (image_size 32) + CLIPProcessor folder, the layout of PickScore_v1 or clip-vit-large."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = write_clip_tokenizer(folder)
        text = _clip_text_config(tokenizer, 32, projection_dim).to_dict()
        vision = dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, projection_dim=projection_dim,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_aesthetic_head(file: str | Path, input_dim: int = 16, seed: int = 0) -> Path:
    """A randomly initialised LAION-aesthetic-v2-layout MLP state dict (``layers.{0,2,4,6,7}``)."""
    from training.rewards.clip import AestheticHead

    file = Path(file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save(AestheticHead(input_dim).state_dict(), file)
    return file
