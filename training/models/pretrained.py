"""Real diffusers pipelines (SD3 / SD3.5, FLUX.1) from a LOCAL folder: loading, prompt encoding with the
pipeline's own text encoders, VAE decoding. The shared base of the "sd3" and "flux" adapters.

- `load_pipeline(kind, path, dtype)`: `StableDiffusion3Pipeline` / `FluxPipeline.from_pretrained(path)`,
  every component frozen and in eval mode. A missing or wrong folder is a ValueError before any loading.
- `PipelinePrompts`: prompts -> {"encoder_hidden_states", "pooled_projections"} through
  `pipeline.encode_prompt`. With `free_text_encoders(prompts)` the conditioning of a fixed prompt pool is
  computed once and the text encoders are dropped (SD3.5's T5-XXL alone is ~9 GB in bf16); later calls
  look prompts up and an unknown prompt is a ValueError.
- `PipelineFlowModel`: a FlowModel holding the pipeline's frozen helpers (text encoders, VAE) outside the
  module tree, so checkpoints and DDP see only the transformer and its adapters; `.to()` moves them along.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from training.models.base import FlowModel
from training.prompts import prompt_pool  # the loop's pool: what it will ask to encode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def load_pipeline(kind: str, path: str | Path, dtype: str | torch.dtype = "float32"):
    """The `kind` ("sd3" | "flux") diffusers pipeline saved at the local folder `path`, frozen."""
    import diffusers

    if kind not in PIPELINES:
        raise ValueError(f"unknown pipeline kind {kind!r}; one of {sorted(PIPELINES)}")
    if not path:
        raise ValueError(f"model.path is required for {kind!r}: a local {PIPELINES[kind]} folder")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model.path {str(folder)!r} does not exist or is not a folder")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"model.path {str(folder)!r} has no model_index.json: not a diffusers pipeline folder "
                         f"(save one with {PIPELINES[kind]}.save_pretrained or download the repository)")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    with warnings.catch_warnings():  # newer diffusers prefer `dtype=`; `torch_dtype=` works on every supported one
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipeline = getattr(diffusers, PIPELINES[kind]).from_pretrained(folder, torch_dtype=dtype)
    for module in pipeline.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    return pipeline


def decode_with_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3/FLUX latents -> images [B, 3, H, W] in [0, 1]: undo the VAE's scaling and shift, decode,
    map [-1, 1] -> [0, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = latents / vae.config.scaling_factor + shift
    images = vae.decode(x.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class PipelinePrompts:
    """Prompt conditioning from a pipeline's text encoders, optionally cached for a fixed prompt pool."""

    def __init__(self, pipeline, max_sequence_length: int):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        if isinstance(pipeline, StableDiffusion3Pipeline):
            self.kind = "sd3"
        elif isinstance(pipeline, FluxPipeline):
            self.kind = "flux"
        else:
            raise ValueError(f"no prompt encoding for {type(pipeline).__name__}; expected an SD3 or FLUX pipeline")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.pipeline = pipeline
        self.max_sequence_length = max_sequence_length
        self.cache: dict[str, dict[str, torch.Tensor]] | None = None  # set once the text encoders are freed
        self._pending_pool: list[str] | None = None  # prompts to cache at the next encode()

    @property
    def text_encoders_freed(self) -> bool:
        return self.cache is not None or self._pending_pool is not None

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Batch-first conditioning of `prompts` (from the cache once the text encoders are freed)."""
        prompts = list(prompts)
        if self._pending_pool is not None:
            self._cache_and_free(self._pending_pool, device)
        if self.cache is not None:
            missing = sorted({p for p in prompts if p not in self.cache})
            if missing:
                raise ValueError(f"the text encoders were freed after caching {len(self.cache)} prompts; "
                                 f"{len(missing)} prompt(s) are not cached, e.g. {missing[0]!r} "
                                 "(set model.free_text_encoders=false to encode new prompts)")
            return {key: torch.stack([self.cache[p][key] for p in prompts]).to(device)
                    for key in ("encoder_hidden_states", "pooled_projections")}
        if self.kind == "sd3":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        else:
            embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def free_text_encoders(self, prompts: list[str], device: torch.device | None = None, batch_size: int = 16,
                           progress: bool = True) -> None:
        """Caches the conditioning of `prompts` (plus "", CFG's negative prompt), then drops the text encoders.

        With no `device` this waits for the first `encode` call, so the encoding runs where the model is by
        then (the GPU after accelerate's prepare), not on the CPU where it was built.
        """
        if self.cache is not None or self._pending_pool is not None:
            raise ValueError("the text encoders are already freed")
        self._batch_size, self._progress = batch_size, progress
        self._pending_pool = list(dict.fromkeys([*prompts, ""]))
        if device is not None:
            self._cache_and_free(self._pending_pool, device)

    @torch.no_grad()
    def _cache_and_free(self, pool: list[str], device: torch.device) -> None:
        self._pending_pool = None
        cache = {}
        steps = range(0, len(pool), self._batch_size)
        for start in tqdm(steps, desc="encoding prompts", disable=not self._progress or len(steps) < 2):
            chunk = pool[start: start + self._batch_size]
            cond = self.encode(chunk, device)
            for i, prompt in enumerate(chunk):
                cache[prompt] = {key: value[i].clone() for key, value in cond.items()}
        self.cache = cache
        for name in TEXT_ENCODERS:
            if getattr(self.pipeline, name, None) is not None:
                setattr(self.pipeline, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class PipelineFlowModel(FlowModel):
    """A FlowModel over a pipeline's transformer, encoding prompts and decoding latents with its other parts."""

    def __init__(self, transformer: nn.Module, pipeline, latent_shape, max_sequence_length: int = 256):
        super().__init__(transformer, latent_shape)
        if getattr(pipeline, "transformer", None) is transformer:
            pipeline.transformer = None  # the FlowModel owns it from now on
        self._pipeline = pipeline  # a DiffusionPipeline is not an nn.Module: not registered, not checkpointed
        self.text = PipelinePrompts(pipeline, max_sequence_length)

    @property
    def max_sequence_length(self) -> int:
        return self.text.max_sequence_length

    @staticmethod
    def latent_shape_for(pipeline, resolution: int, channels: int, multiple: int):
        """(channels, resolution / vae factor, same): `resolution` must be a multiple of vae factor * `multiple`."""
        factor = pipeline.vae_scale_factor
        if resolution % (factor * multiple):
            raise ValueError(f"model.resolution {resolution} must be a multiple of {factor * multiple} "
                             f"(VAE factor {factor} x {multiple})")
        return (channels, resolution // factor, resolution // factor)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.text.encode(prompts, self._device())

    def free_text_encoders(self, prompts: list[str], now: bool = False, progress: bool = True) -> None:
        """Encodes a fixed prompt pool once (now, or at the first encode_prompts), then frees the text
        encoders' memory (see PipelinePrompts.free_text_encoders)."""
        self.text.free_text_encoders(prompts, self._device() if now else None, progress=progress)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable w.r.t. latents that require grad (reward-gradient analyses); the VAE stays frozen."""
        return decode_with_vae(self._pipeline.vae, latents)

    def _device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def _apply(self, fn, *args, **kwargs):
        """Moves the pipeline's frozen helpers (text encoders, VAE) along with the module."""
        out = super()._apply(fn, *args, **kwargs)
        device = self._device()
        for name in (*TEXT_ENCODERS, "vae"):
            module = getattr(self._pipeline, name, None)
            if module is not None:
                module.to(device)
        return out


def maybe_free_text_encoders(model: PipelineFlowModel, cfg) -> PipelineFlowModel:
    """model.free_text_encoders: cache the prompt pool's conditioning, then drop the text encoders."""
    if cfg.model.free_text_encoders:
        model.free_text_encoders(prompt_pool(cfg), progress=cfg.log.progress)
    return model
