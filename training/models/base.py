"""FlowModel: one velocity interface over a diffusers transformer, with LoRA / full fine-tuning and the
extra policies (reference, old, EMA) the RL methods need.

Conventions (diffusers flow matching): sigma in [0, 1] (1 = noise), x_t = (1 - sigma) x0 + sigma * eps,
velocity target u = eps - x0, denoised estimate x0_hat = x_t - sigma * v.

A subclass (toy, sd3, flux) sets `transformer` and `latent_shape` through `FlowModel.__init__` and
implements three things:

    encode_prompts(prompts)                                 -> dict of batch-first conditioning tensors
    predict_velocity(transformer, latents, sigma, cond)     -> v, the shape of latents
    decode(latents)                                         -> images [B, 3, H, W] in [0, 1]

`predict_velocity` must call the `transformer` it is given (not `self.transformer`): under full fine-tuning
`reference()` / `use_adapter()` hand it a frozen copy. The public `velocity` (and `forward`, which is what
a DDP wrapper calls) picks the module in use and delegates.

Fine-tuning (`configure_finetuning`, called once by `training.models.build_model`):
- "lora": the transformer is wrapped by peft (`get_peft_model`, adapter "default"); every other weight is
  frozen. The reference policy is the base model (`disable_adapter`); extra policies ("old", "ema", ...)
  are further peft adapters. peft's gaussian init sets lora_B = 0, so at start every policy equals the
  reference exactly.
- "full": every transformer weight trains; the reference and each extra policy are frozen deep copies.

Checkpoints (`checkpoint_keys`, `checkpoint_state_dict`, `load_checkpoint_state`; wired into accelerate by
`training.checkpoint`) hold only the state training changes: the trained parameters and the extra policies.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

DEFAULT_ADAPTER = "default"

# The attention projections of SD3/SD3.5 joint blocks (and FLUX double blocks): the LoRA targets of
# DiffusionNFT, AWM and Flow-GRPO. Matched by peft as module-name suffixes.
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class FlowModel(nn.Module):
    """One velocity interface over a diffusers transformer. sigma in [0,1], x_t = (1-sigma) x0 + sigma*eps,
    target u = eps - x0."""

    #: LoRA target modules used when the config gives none (subclasses may override).
    default_lora_targets: tuple[str, ...] = ATTENTION_LORA_TARGETS

    def __init__(self, transformer: nn.Module, latent_shape: Sequence[int]):
        super().__init__()
        self.transformer = transformer
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.finetune_mode: str | None = None  # "lora" | "full" once configured
        self.frozen_copies = nn.ModuleDict()  # full fine-tuning: "reference" and the extra policies
        self._lora_config = None
        self._trainable_names: list[str] = []
        self._in_use: str | None = None  # full fine-tuning: name of the frozen copy in use

    # ------------------------------------------------------------------------------------------------
    # What a subclass implements

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batch-first conditioning tensors for `predict_velocity` (no gradient needed)."""
        raise NotImplementedError

    def predict_velocity(self, transformer: nn.Module, latents: torch.Tensor, sigma: torch.Tensor,
                         cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Velocity of `transformer` at (latents, sigma [B], cond); converts sigma to the model's timestep."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] view of latents, one row per spatial token (for per-token NormGuard norms).

        [B, C, H, W] -> [B, H*W, C]; [B, L, C] (packed, e.g. FLUX) stays as is.
        """
        if x.dim() == 4:
            return x.movedim(1, -1).flatten(1, 2)
        if x.dim() == 3:
            return x
        raise ValueError(f"to_tokens expects [B, C, H, W] or [B, L, C] latents, got shape {tuple(x.shape)}")

    # ------------------------------------------------------------------------------------------------
    # The velocity interface

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """v(latents, sigma, cond) of the policy in use (the trained one unless inside reference()/use_adapter())."""
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32)
        if sigma.dim() == 0:
            sigma = sigma.expand(latents.shape[0])
        if sigma.shape != (latents.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [B]=({latents.shape[0]},), "
                             f"got {tuple(sigma.shape)}")
        return self.predict_velocity(self._transformer_in_use(), latents, sigma, cond)

    def forward(self, latents, sigma, cond):
        return self.velocity(latents, sigma, cond)

    def _transformer_in_use(self) -> nn.Module:
        return self.transformer if self._in_use is None else self.frozen_copies[self._in_use]

    # ------------------------------------------------------------------------------------------------
    # Fine-tuning set-up

    def configure_finetuning(self, mode: str = "lora", *, lora_r: int = 8, lora_alpha: float = 16.0,
                             target_modules: Sequence[str] | None = None, init_lora_weights: str | bool = "gaussian",
                             lora_dropout: float = 0.0) -> None:
        """LoRA through peft (reference = adapter disabled) or full fine-tuning with a frozen reference copy."""
        if self.finetune_mode is not None:
            raise ValueError(f"fine-tuning is already configured ({self.finetune_mode!r})")
        self.requires_grad_(False)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            if lora_r < 1:
                raise ValueError(f"lora_r must be >= 1, got {lora_r}")
            targets = list(target_modules) if target_modules else list(self.default_lora_targets)
            self._lora_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=targets,
                                           init_lora_weights=init_lora_weights, lora_dropout=lora_dropout)
            self.transformer = get_peft_model(self.transformer, self._lora_config, adapter_name=DEFAULT_ADAPTER)
            prefix = f".{DEFAULT_ADAPTER}."
            self._trainable_names = [n for n, _ in self.named_parameters() if n.startswith("transformer.")
                                     and ".lora_" in n and prefix in n]
        elif mode == "full":
            self.transformer.requires_grad_(True)
            self._trainable_names = [n for n, _ in self.named_parameters() if n.startswith("transformer.")]
            self.frozen_copies["reference"] = self._frozen_copy()
        else:
            raise ValueError(f"finetune mode must be 'lora' or 'full', got {mode!r}")
        if not self._trainable_names:
            raise ValueError("no trainable parameters: check finetune.target_modules against the transformer's "
                             "module names")
        self.finetune_mode = mode
        self._restore_trainable()

    def _frozen_copy(self) -> nn.Module:
        module = copy.deepcopy(self.transformer)
        module.requires_grad_(False)
        return module

    def _restore_trainable(self) -> None:
        """Exactly the trained weights require grad (peft's set_adapter/add_adapter toggle flags)."""
        trainable = set(self._trainable_names)
        for name, p in self.named_parameters():
            p.requires_grad_(name in trainable)

    def _require_configured(self) -> None:
        if self.finetune_mode is None:
            raise ValueError("call configure_finetuning() first")

    def trainable_parameters(self) -> list[nn.Parameter]:
        self._require_configured()
        params = dict(self.named_parameters())
        return [params[n] for n in self._trainable_names]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        self._require_configured()
        params = dict(self.named_parameters())
        return [(n, params[n]) for n in self._trainable_names]

    # ------------------------------------------------------------------------------------------------
    # Extra policies: reference, named adapters (old / ema / ref), copies and EMA

    def adapter_names(self) -> list[str]:
        if self.finetune_mode == "lora":
            return [n for n in self.transformer.peft_config if n != DEFAULT_ADAPTER]
        return [n for n in self.frozen_copies if n != "reference"]

    def add_adapter(self, name: str) -> None:
        """A frozen extra policy `name`, initialised as a copy of the trained one."""
        self._require_configured()
        if name in (DEFAULT_ADAPTER, "reference") or name in self.adapter_names():
            raise ValueError(f"adapter name {name!r} is reserved or already exists")
        if self.finetune_mode == "lora":
            self.transformer.add_adapter(name, copy.deepcopy(self._lora_config))
            self.transformer.set_adapter(DEFAULT_ADAPTER)
        else:
            self.frozen_copies[name] = self._frozen_copy()
        self._restore_trainable()
        self.copy_adapter(DEFAULT_ADAPTER, name)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: velocity() is the reference policy (adapter disabled / frozen pretrained copy)."""
        self._require_configured()
        if self.finetune_mode == "lora":
            with self.transformer.disable_adapter():
                yield
        else:
            with self._using_copy("reference"):
                yield

    @contextlib.contextmanager
    def use_adapter(self, name: str) -> Iterator[None]:
        """Inside: velocity() is the named policy ("default" = the trained one, "reference", "old", "ema", ...)."""
        self._require_configured()
        if name == DEFAULT_ADAPTER:
            yield
            return
        if name == "reference":
            with self.reference():
                yield
            return
        if name not in self.adapter_names():
            raise ValueError(f"unknown adapter {name!r}; have {[DEFAULT_ADAPTER, 'reference', *self.adapter_names()]}")
        if self.finetune_mode == "lora":
            self.transformer.set_adapter(name)
            try:
                yield
            finally:
                self.transformer.set_adapter(DEFAULT_ADAPTER)
                self._restore_trainable()
        else:
            with self._using_copy(name):
                yield

    @contextlib.contextmanager
    def _using_copy(self, name: str) -> Iterator[None]:
        previous, self._in_use = self._in_use, name
        try:
            yield
        finally:
            self._in_use = previous

    def _paired_parameters(self, src: str, dst: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(src param, dst param) pairs of two policies (LoRA adapters or full copies)."""
        self._require_configured()
        if self.finetune_mode == "lora":
            named = dict(self.transformer.named_parameters())
            pairs = []
            for n, p in named.items():
                if ".lora_" in n and f".{src}." in n:
                    other = n.replace(f".{src}.", f".{dst}.")
                    if other not in named:
                        raise ValueError(f"adapter {dst!r} has no parameter matching {n!r}")
                    pairs.append((p, named[other]))
            if not pairs:
                raise ValueError(f"adapter {src!r} has no LoRA parameters")
            return pairs
        modules = {DEFAULT_ADAPTER: self.transformer, **dict(self.frozen_copies.items())}
        for name in (src, dst):
            if name not in modules:
                raise ValueError(f"unknown policy {name!r}")
        return list(zip(modules[src].parameters(), modules[dst].parameters()))

    @torch.no_grad()
    def copy_adapter(self, src: str, dst: str) -> None:
        """dst <- src (e.g. DPO's reference refresh)."""
        for p_src, p_dst in self._paired_parameters(src, dst):
            p_dst.copy_(p_src)

    @torch.no_grad()
    def ema_update(self, dst: str, decay: float, src: str = DEFAULT_ADAPTER) -> None:
        """dst <- decay * dst + (1 - decay) * src (NFT's old policy, AWM's EMA policy)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        for p_src, p_dst in self._paired_parameters(src, dst):
            p_dst.lerp_(p_src.to(p_dst.dtype), 1.0 - decay)

    # ------------------------------------------------------------------------------------------------
    # Checkpoint state: what training changes (the rest is rebuilt from the config)

    def checkpoint_keys(self) -> list[str]:
        """The state_dict keys that training changes, in state_dict order: the trained policy's parameters and
        those of the extra policies the methods update (`copy_adapter` / `ema_update`: "old", "ema", "ref"; peft
        adapters, or frozen copies under full fine-tuning). Everything else (base weights, the reference policy,
        frozen helpers such as the toy's caption encoder, constant buffers such as positional embeddings) is
        rebuilt identically by `build_model` + `Method.setup`, so a checkpoint need not hold it."""
        changing = {id(p) for p in self.trainable_parameters()}
        for name in self.adapter_names():
            changing.update(id(dst) for _, dst in self._paired_parameters(DEFAULT_ADAPTER, name))
        return [n for n, p in self.named_parameters() if id(p) in changing]

    def checkpoint_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The `checkpoint_keys()` entries of the state_dict (detached, no copy)."""
        keys = set(self.checkpoint_keys())
        return OrderedDict((n, p.detach()) for n, p in self.named_parameters() if n in keys)

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Loads a `checkpoint_state_dict()`, checked strictly: its keys must be exactly `checkpoint_keys()`
        (so the keys it lacks are exactly the frozen ones, rebuilt from the config) with the model's shapes.
        A full state_dict (every key of the model: checkpoints written before they were trimmed) loads too.
        Anything else (another LoRA rank or target set, fine-tuning mode, method, model) is a ValueError
        naming the differences, raised before any weight is touched."""
        expected = self.checkpoint_keys()
        model_state = self.state_dict()
        saved = set(state)
        full = saved == set(model_state)
        problems = []
        unknown = sorted(saved - set(model_state))
        if unknown:
            problems.append(f"{len(unknown)} key(s) the model does not have, e.g. {unknown[:3]}")
        if not full:
            lacking = [k for k in expected if k not in saved]
            if lacking:
                problems.append(f"{len(lacking)} trained/updated weight(s) missing, e.g. {lacking[:3]}")
            frozen = sorted(saved & set(model_state) - set(expected))
            if frozen:
                problems.append(f"{len(frozen)} frozen weight(s) that only a full state_dict would hold, "
                                f"e.g. {frozen[:3]}")
        shapes = [f"{k}: saved {tuple(state[k].shape)}, model {tuple(model_state[k].shape)}"
                  for k in sorted(saved & set(model_state)) if state[k].shape != model_state[k].shape]
        if shapes:
            problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
        if problems:
            lora = f", lora_r={self._lora_config.r}" if self.finetune_mode == "lora" else ""
            raise ValueError(
                f"{source} does not match this model (finetune.mode={self.finetune_mode}{lora}, extra policies "
                f"{self.adapter_names()}, {len(expected)} trained/updated tensors): " + "; ".join(problems) +
                ". Was it written with another model, fine-tuning mode, LoRA rank / targets or method?")
        self.load_state_dict(state, strict=full)

    # ------------------------------------------------------------------------------------------------
    # Export

    def save_trained(self, directory: str) -> None:
        """The trained weights in their library format (peft adapter folder, or a diffusers model folder)."""
        self._require_configured()
        if self.finetune_mode == "lora":
            self.transformer.save_pretrained(directory, selected_adapters=[DEFAULT_ADAPTER])
        else:
            self.transformer.save_pretrained(directory)
