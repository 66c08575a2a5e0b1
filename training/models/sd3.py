"""SD3 / SD3.5 (`SD3Transformer2DModel`) behind the FlowModel interface.

The transformer takes timestep = sigma * 1000; prompts go through the pipeline's three text encoders
(`StableDiffusion3Pipeline.encode_prompt`); latents decode through the VAE with its scaling and shift.
Loading, prompt encoding (with the optional prompt cache that frees the text encoders) and decoding are
shared with FLUX in `training.models.pretrained`; the pipeline's text encoders and VAE stay outside the
module tree (frozen helpers): checkpoints and DDP see only the transformer and its adapters.
"""

from __future__ import annotations

from training.models.registry import register_model
from training.models.pretrained import PipelineFlowModel, load_pipeline, maybe_free_text_encoders


class SD3FlowModel(PipelineFlowModel):
    @classmethod
    def from_pipeline(cls, pipeline, resolution: int, max_sequence_length: int = 256) -> "SD3FlowModel":
        transformer = pipeline.transformer
        config = transformer.config
        latent_shape = cls.latent_shape_for(pipeline, resolution, config.in_channels, multiple=config.patch_size)
        return cls(transformer, pipeline, latent_shape, max_sequence_length)

    def predict_velocity(self, transformer, latents, sigma, cond):
        dtype = next(transformer.parameters()).dtype
        return transformer(hidden_states=latents.to(dtype),
                           encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                           pooled_projections=cond["pooled_projections"].to(dtype), timestep=sigma * 1000,
                           return_dict=False)[0].to(latents.dtype)


@register_model("sd3")
def build_sd3(cfg) -> SD3FlowModel:
    """A local StableDiffusion3Pipeline folder (SD3 / SD3.5), frozen weights in cfg.model.dtype."""
    pipeline = load_pipeline("sd3", cfg.model.path, cfg.model.dtype)
    model = SD3FlowModel.from_pipeline(pipeline, cfg.model.resolution, cfg.model.max_sequence_length)
    return maybe_free_text_encoders(model, cfg)
