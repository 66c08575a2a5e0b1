"""The model registry: model type -> builder `(cfg: Config) -> FlowModel`.

A leaf module (it imports only training.registry), so that the builders (toy.py, sd3.py, flux.py) can register
with `@register_model(name)` and training.config can check `model.type` against the registered names without
either importing the other. Importing it runs training/models/__init__.py first, which imports the built-in
builders, so the registry is complete whenever it is read.
"""

from __future__ import annotations

from training.registry import Registry

MODELS: Registry = Registry("model type")  # name -> builder (cfg: Config) -> FlowModel
register_model = MODELS.register  # decorator: the builder of `model.type` == name

__all__ = ["MODELS", "register_model"]
