"""Model registry: `@register_model(name)` on a builder `(cfg: Config) -> FlowModel`; `build_model(cfg)`.

The registry itself is the leaf module registry.py (training.config reads it from there). Built-ins, registered
when this package is imported: "toy" (toy.py, the embedded default), "toy_flux" (toy_flux.py, its
FLUX-architecture twin), "sd3" (sd3.py, a local StableDiffusion3Pipeline folder), "flux" (flux.py).
`build_model` then sets up LoRA / full fine-tuning from `cfg.finetune`, so builders only construct the model
(frozen weights, text encoders, VAE) and never touch adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.models.base import DEFAULT_ADAPTER, FlowModel
from training.models.registry import MODELS, register_model

if TYPE_CHECKING:
    from training.config import Config


def build_model(cfg: "Config") -> FlowModel:
    """The model of `cfg.model.type`, with fine-tuning configured from `cfg.finetune`."""
    model = MODELS.lookup(cfg.model.type)(cfg)
    if not isinstance(model, FlowModel):
        raise TypeError(f"builder of {cfg.model.type!r} returned {type(model).__name__}, not a FlowModel")
    ft = cfg.finetune
    model.configure_finetuning(ft.mode, lora_r=ft.lora_r, lora_alpha=ft.lora_alpha,
                               target_modules=ft.target_modules or None,
                               init_lora_weights=True if ft.init_lora_weights == "default" else ft.init_lora_weights)
    return model


from training.models import flux  # noqa: E402,F401  (registers "flux")
from training.models import sd3  # noqa: E402,F401  (registers "sd3")
from training.models import toy  # noqa: E402,F401  (registers "toy")
from training.models import toy_flux  # noqa: E402,F401  (registers "toy_flux")

__all__ = ["MODELS", "FlowModel", "DEFAULT_ADAPTER", "register_model", "build_model"]
