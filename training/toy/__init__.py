"""The embedded default's world: synthetic captioned images and the toy reference models' pretraining.

`is_toy(model_type)` is the one place that says which model types live in this world (the SD3-architecture
toy "toy" and the FLUX-architecture toy "toy_flux"): they need no model.path, their prompts default to the toy
captions, and the toy-data quality proxy applies to them. Everything that treats the toys specially asks it.
"""

TOY_MODEL_TYPES = ("toy", "toy_flux")


def is_toy(model_type: str) -> bool:
    """True for the model types built from the embedded toy world (no pipeline folder, toy captions)."""
    return model_type in TOY_MODEL_TYPES
