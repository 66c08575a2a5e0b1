"""The one loop every method shares.

Each RL step: rollout (the method's sampling policy, ODE/SDE) -> reward -> per-prompt group advantages ->
training items (method) -> the method's loss on forward-noised samples, micro-batched with gradient
accumulation -> optimizer update (non-finite gradients skip it) -> the method's old/EMA/ref policy update ->
log (CSV, TensorBoard) -> evaluation -> checkpoint (atomic, accelerate save_state, trimmed to the weights
training changes: training.checkpoint).

Batch geometry is free: the P x G rollout slots are spread round-robin over however many processes run, each
process samples its slots in chunks of rollout.batch_size, and the rewards are all-gathered so every
advantage uses its whole prompt group. All randomness of a slot (initial noise, SDE noise) and of a training
item (timesteps, noise) comes from a generator seeded by (seed, step, index): results do not depend on the
chunking, and `--resume` replays the same numbers.

What the loop reads from a method is the Method contract (training.methods.base: the class attributes,
`timestep_scheme` / `num_timesteps`, the hooks); the training timesteps come from training.sampling.train_sigmas
and the prompts from training.prompts. One RL step's training (`Trainer.train_on`) is named steps:
_share_latents -> _micro_batches -> per micro-batch _batch, _accumulate (loss, backward, and _optimizer_step at
an update boundary) -> StepMetrics.reduce (training.step_metrics).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from training.checkpoint import latest_checkpoint, register_checkpoint_hooks, resume_checkpoint, save_checkpoint
from training.config import Config, diff_configs, dump_config, load_config
from training.methods import build_method
from training.methods.base import Item, TrainBatch
from training.models import build_model
from training.prompts import prompt_pool
from training.rewards import build_reward
from training.sampling import policy_velocity, sample, sigma_schedule, train_sigmas
from training.step_metrics import StepMetrics
from training.grids import EvalGrid, spread
from training.guards import check_launch, check_model_folder, check_prompt_file, check_reward_output, finite_items
from training.timing import COLUMNS as TIME_COLUMNS
from training.timing import StepTimer
from training.tracking import CSVTracker, accelerate_trackers, plot_run

# stream tags for seeded generators
_PROMPTS, _ROLLOUT, _TRAIN, _SHUFFLE, _EVAL = range(5)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of the integer keys (numpy's SeedSequence mixing)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def group_advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, std: str = "global") -> torch.Tensor:
    """(r - mean of its prompt's group) / (std + 1e-4); std over all rewards ("global", DiffusionNFT/AWM) or
    over the group ("group")."""
    rewards = rewards.double()
    adv = torch.empty_like(rewards)
    scale = torch.empty_like(rewards)
    for p in prompt_ids.unique().tolist():
        mask = prompt_ids == p
        adv[mask] = rewards[mask] - rewards[mask].mean()
        scale[mask] = rewards[mask].std(unbiased=False)
    if std == "global":
        scale.fill_(rewards.std(unbiased=False).item())
    elif std != "group":
        raise ValueError(f"std must be 'global' or 'group', got {std!r}")
    return (adv / (scale + 1e-4)).float()


@dataclass
class MicroBatch:
    """One micro-batch of one process: its (global index, item) pairs, the weight of each of its rows (0 for the
    padding that keeps every process on the same number of micro-batches) and the real rows of its optimizer
    update over all processes (the loss is a mean over those)."""

    chunk: list[tuple[int, Item]]
    weight: torch.Tensor  # [items x timesteps], 1 (real) or 0 (padding)
    real_rows: int


@dataclass
class RunState:
    """The loop's own state, saved with every checkpoint (accelerate register_for_checkpointing)."""

    step: int = 0
    eval_rewards: dict = field(default_factory=dict)  # step -> evaluation reward
    last_norm_ratio: float = math.nan

    def state_dict(self):
        return {"step": self.step, "eval_rewards": dict(self.eval_rewards), "last_norm_ratio": self.last_norm_ratio}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.eval_rewards = {int(k): float(v) for k, v in state["eval_rewards"].items()}
        self.last_norm_ratio = float(state["last_norm_ratio"])


@dataclass
class Summary:
    run_dir: Path
    reward_before: float
    reward_after: float
    norm_ratio: float
    csv: Path
    plot: Path
    checkpoint: Path
    trained_weights: Path
    seconds: float
    steps: int
    setup_seconds: float = 0.0
    grids: list = field(default_factory=list)  # sample grid PNGs, first (before training) and last evaluation
    timing: str = ""  # mean seconds per step and section (training.timing)

    def lines(self) -> list[str]:
        return [
            f"run directory      {self.run_dir}",
            f"eval reward        {self.reward_before:.4f} (before) -> {self.reward_after:.4f} "
            f"(after, step {self.steps})",
            f"norm ratio         ||v||/||v_ref|| = {self.norm_ratio:.4f} (last step, mean over trained timesteps)",
            f"metrics CSV        {self.csv}",
            f"plot               {self.plot}",
            f"checkpoint         {self.checkpoint}",
            f"trained weights    {self.trained_weights}",
            *([f"sample grids       {self.grids[0]} (before) -> {self.grids[-1]} (after)"] if self.grids else []),
            *([f"time per step      {self.timing}"] if self.timing else []),
            f"time               {self.setup_seconds:.1f} s set-up (model, pretraining or cache) + "
            f"{self.seconds:.1f} s RL",
        ]


class Trainer:
    def __init__(self, cfg: Config, resume: bool | str = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.created = time.time()
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.accelerator = acc = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                             gradient_accumulation_steps=cfg.train.grad_accum,
                                             project_dir=str(self.run_dir),
                                             log_with=accelerate_trackers(cfg.log.trackers, self.run_dir,
                                                                          cfg.log.run_name) or None)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        elif acc.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ and acc.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))  # no oversubscription
        check_launch(acc)  # the processes and the engine the launch asked for (FSDP is GPU-only in accelerate)
        self.progress = cfg.log.progress and acc.is_local_main_process
        slots = cfg.rollout.prompts_per_step * cfg.rollout.group_size
        if slots < acc.num_processes:
            raise ValueError(f"{slots} rollout images per step cannot be spread over {acc.num_processes} processes")
        self.resume_from = self._resume_checkpoint(resume)
        set_seed(cfg.train.seed)

        # everything that can fail on bad input before the expensive parts (pretraining, model loading)
        check_prompt_file(cfg.rollout.prompt_file)
        check_model_folder(cfg.model.type, cfg.model.path)
        self.prompts = prompt_pool(cfg)
        self.reward = build_reward(cfg.reward.name, **cfg.reward.kwargs)
        self.method = build_method(cfg)
        self.model = build_model(cfg)
        self.method.setup(self.model)
        self.model.to(acc.device)
        self.timer = StepTimer(acc.device)
        self._check_reward()
        optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=cfg.train.lr,
                                      weight_decay=cfg.train.weight_decay)
        self.ddp_model, self.optimizer = acc.prepare(self.model, optimizer)
        register_checkpoint_hooks(acc, self.model)  # checkpoints hold what training changes, not frozen weights
        self.state = RunState()
        acc.register_for_checkpointing(self.state)
        if self.method.guard is not None:  # adaptive NormGuard: lambda and its statistics, exact on --resume
            acc.register_for_checkpointing(self.method.guard)
        self.sampler_sigmas = sigma_schedule(cfg.sampling.num_steps, cfg.sampling.shift)
        self.buckets = torch.linspace(0, 1, cfg.log.ratio_buckets + 1)
        self.bucket_names = [f"norm_ratio/{lo:.2f}-{hi:.2f}" for lo, hi in zip(self.buckets[:-1].tolist(),
                                                                              self.buckets[1:].tolist())]
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
        self._init_logs()
        self.grid = self._eval_grid()

    # ------------------------------------------------------------------------------------------------
    # set-up helpers

    def _resume_checkpoint(self, resume) -> Path | None:
        """The checkpoint to resume from (training.checkpoint.resume_checkpoint), refused if the config changed
        anything but train.steps and log.*."""
        path = resume_checkpoint(self.run_dir, resume)
        if path is None:
            return None
        saved = self.run_dir / "config.yaml"
        if saved.is_file():
            changed = [k for k in diff_configs(load_config(saved), self.cfg)
                       if k not in ("train.steps",) and not k.startswith("log.")]
            if changed:
                raise ValueError(f"--resume: the config differs from the run's config.yaml in {changed}; "
                                 "only train.steps and log.* may change")
        return path

    def _init_logs(self):
        acc = self.accelerator
        columns = ["reward_mean", "reward_std", "loss", *self.method.term_names, "norm_ratio", "ng_lambda",
                   *self.bucket_names, "grad_norm", "skipped_updates", "nonfinite_losses", "nonfinite_rewards",
                   "eval_reward", "seconds", *TIME_COLUMNS]
        self.csv_path = self.run_dir / "metrics.csv"
        if acc.is_main_process:
            if self.resume_from is None:  # a fresh run in a used directory: old checkpoints/logs would mix in
                stale = [self.run_dir / name for name in ("checkpoints", "tensorboard", "trained_weights", "samples")
                         if (self.run_dir / name).exists()]
                if stale:
                    print(f"starting a fresh run in {self.run_dir}: removing the previous run's "
                          f"{', '.join(p.name for p in stale)} (use --resume to continue it instead)", flush=True)
                for path in stale:
                    shutil.rmtree(path)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        acc.wait_for_everyone()
        self.csv = CSVTracker(self.csv_path, columns, resume_step=self.state.step if self.resume_from else None) \
            if acc.is_main_process else None
        if acc.log_with:  # tensorboard / wandb (training.tracking.accelerate_trackers)
            acc.init_trackers(self.cfg.log.run_name, config=_flatten(self.cfg.to_dict()))

    def log(self, values: dict, step: int):
        if self.csv is not None:
            self.csv.log(values, step)
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in values.items() if not math.isnan(v)}, step=step)

    # ------------------------------------------------------------------------------------------------
    # sampling

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        unique = sorted(set(prompts))
        with torch.no_grad():
            enc = self.model.encode_prompts(unique)
        index = torch.tensor([unique.index(p) for p in prompts], device=self.accelerator.device)
        return {k: v.index_select(0, index.to(v.device)) for k, v in enc.items()}

    def _generate(self, prompts: list[str], generators: list[torch.Generator], num_steps: int, sampler: str,
                  policy: str, bar=None, record: bool = False) -> torch.Tensor:
        """Clean latents for the prompts, one generator per image (initial noise, then SDE noise). record: a coupled
        method (GRPO) samples itself -> (clean latents, its per-image record of the trajectory)."""
        cfg, device = self.cfg.sampling, self.accelerator.device
        sigmas = sigma_schedule(num_steps, cfg.shift)
        x1 = torch.stack([torch.randn(self.model.latent_shape, generator=g) for g in generators]).to(device)
        step_noise = None
        if sampler == "sde" or record:
            step_noise = torch.stack([torch.randn((num_steps, *self.model.latent_shape), generator=g)
                                      for g in generators], dim=1).to(device)
        cond = self._encode(prompts)
        uncond = self._encode([""] * len(prompts)) if cfg.guidance_scale != 1.0 else None
        with torch.no_grad(), self.model.use_adapter(policy), self.accelerator.autocast():
            velocity = policy_velocity(self.model, cond, cfg.guidance_scale, uncond, cfg.rescale_to_reference,
                                       cfg.rescale_phi, forward=self.ddp_model)
            progress = None if bar is None else (lambda: bar.update(len(prompts)))
            if record:
                return self.method.sample_rollout(velocity, x1, sigmas, step_noise, generators, progress)
            return sample(velocity, x1, sigmas, sampler, cfg.noise_level, step_noise, progress=progress)

    def _score(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad(), self.timer("reward"):
            out = self.reward(self.model.decode(latents), prompts)
            return check_reward_output(out, len(prompts), self.cfg.reward.name).float().cpu()

    def _check_reward(self) -> None:
        """The reward's output contract (a float tensor [B]) on two decoded images, before any training."""
        with torch.no_grad():
            x = torch.zeros((2, *self.model.latent_shape), device=self.accelerator.device)
            self._score(x, self.prompts[:1] * 2)
        self.timer.discard()

    def _local_slots(self, total: int) -> list[int]:
        acc = self.accelerator
        return list(range(acc.process_index, total, acc.num_processes))

    def _gather(self, pairs: list) -> list:
        from accelerate.utils import gather_object

        return gather_object(pairs) if self.accelerator.num_processes > 1 else pairs

    def rollout(self, step: int):
        """-> (local latents {slot: x0} (a coupled method: {slot: its trajectory record}), all rewards [S], all prompt
        ids [S], prompt strings per slot)."""
        cfg = self.cfg
        P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
        g = seeded_generator(cfg.train.seed, _PROMPTS, step)
        chosen = torch.randperm(len(self.prompts), generator=g)[:P] if P <= len(self.prompts) \
            else torch.randint(len(self.prompts), (P,), generator=g)
        prompt_ids = chosen.repeat_interleave(G)
        slot_prompts = [self.prompts[i] for i in prompt_ids.tolist()]
        local = self._local_slots(P * G)
        latents, scored = {}, []
        bs = cfg.rollout.batch_size
        with tqdm(total=len(local) * cfg.sampling.num_steps, desc=f"rollout {step}", leave=False,
                  disable=not self.progress, unit="img-step", dynamic_ncols=True) as bar:
            for start in range(0, len(local), bs):
                chunk = local[start:start + bs]
                prompts = [slot_prompts[j] for j in chunk]
                coupled = self.method.coupled
                out = self._generate(prompts, [seeded_generator(cfg.train.seed, _ROLLOUT, step, j) for j in chunk],
                                     cfg.sampling.num_steps, cfg.sampling.sampler, self.method.rollout_policy(), bar,
                                     record=coupled)
                x0, kept = out if coupled else (out, out)
                rewards = self._score(x0, prompts)
                for j, x, r in zip(chunk, kept, rewards.tolist()):
                    latents[j] = x
                    scored.append((j, r))
        all_rewards = torch.empty(P * G)
        for j, r in self._gather(scored):
            all_rewards[j] = r
        return latents, all_rewards, prompt_ids, slot_prompts

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean reward of the trained policy on fixed prompts and fixed noise (ODE, eval.num_steps)."""
        cfg = self.cfg
        prompts = self.prompts[: cfg.eval.num_prompts] if cfg.eval.num_prompts else self.prompts
        slots = [p for p in prompts for _ in range(cfg.eval.samples_per_prompt)]
        local = self._local_slots(len(slots))
        num_steps = cfg.eval.num_steps or cfg.sampling.num_steps
        scored = []
        for start in range(0, len(local), cfg.rollout.batch_size):
            chunk = local[start:start + cfg.rollout.batch_size]
            chunk_prompts = [slots[j] for j in chunk]
            x0 = self._generate(chunk_prompts, [seeded_generator(cfg.train.seed, _EVAL, j) for j in chunk],
                                num_steps, "ode", "default")
            scored += list(zip(chunk, self._score(x0, chunk_prompts).tolist()))
        rewards = [r for _, r in self._gather(scored)]
        return float(np.mean(rewards))

    def _eval_grid(self) -> EvalGrid | None:
        """The sample grid of every evaluation (training.grids): eval.grid_prompts prompts spread over the
        evaluation's, each with the evaluation's noise of its first sample (so the grid shows evaluated images)."""
        cfg = self.cfg
        if not cfg.eval.grid_prompts:
            return None
        prompts = self.prompts[: cfg.eval.num_prompts] if cfg.eval.num_prompts else self.prompts
        chosen = spread(prompts, cfg.eval.grid_prompts)
        noise = torch.stack([torch.randn(self.model.latent_shape, generator=seeded_generator(
            cfg.train.seed, _EVAL, k * cfg.eval.samples_per_prompt)) for k in chosen])
        return EvalGrid(self.model, self.reward, [prompts[k] for k in chosen], noise,
                        cfg.eval.num_steps or cfg.sampling.num_steps, cfg.sampling, self.accelerator,
                        self.run_dir / "samples", forward=self.ddp_model,
                        title=f"{cfg.log.run_name}: {cfg.method.name}, ng_lambda={cfg.normguard.ng_lambda}")

    def _say(self, text: str) -> None:
        """One line on the main process, above the progress bars."""
        if self.accelerator.is_main_process:
            tqdm.write(text)

    def _write_grid(self, step: int) -> None:
        if self.grid is not None:
            self.grid(step)

    # ------------------------------------------------------------------------------------------------
    # training

    def _assign(self, items: list[Item], step: int, epoch: int):
        """-> (this process's items with their global index, per-process item counts)."""
        acc = self.accelerator
        world, rank = acc.num_processes, acc.process_index
        order = torch.randperm(len(items), generator=seeded_generator(self.cfg.train.seed, _SHUFFLE, step, epoch))
        indexed = [(int(k), items[k]) for k in order.tolist()]
        if self.method.slots_per_item == 1:  # items stay with the process that sampled their slot: no transfer
            owner = [it.slots[0] % world for _, it in indexed]
        else:
            owner = [n % world for n in range(len(indexed))]
        counts = [owner.count(p) for p in range(world)]
        mine = [pair for pair, o in zip(indexed, owner) if o == rank]
        return mine, counts

    def _batch(self, chunk: list[tuple[int, Item]], latents: dict, cond_prompts: list[str], step: int,
               epoch: int) -> TrainBatch:
        T, k = self.method.num_timesteps, self.method.slots_per_item
        gens = [seeded_generator(self.cfg.train.seed, _TRAIN, step, epoch, idx) for idx, _ in chunk]
        if self.method.coupled:  # GRPO: the rows are the rollout's own transitions, not forward-noised x0
            prompts = [cond_prompts[it.slots[0]] for _, it in chunk for _ in range(T)]
            return self.method.transition_batch([it for _, it in chunk], latents, gens, prompts, self._encode)
        sigmas = train_sigmas(self.method.timestep_scheme, len(chunk), T, self.sampler_sigmas,
                              self.cfg.sampling.shift, gens)
        noise = torch.stack([torch.randn((T, *self.model.latent_shape), generator=g) for g in gens])  # [I, T, ...]
        device = self.accelerator.device
        slots = [it.slots for _, it in chunk]
        x0 = torch.stack([torch.stack([latents[s] for s in ss]) for ss in slots])  # [I, k, ...]
        I = len(chunk)
        expand = lambda x: x.reshape(I * T * k, *x.shape[3:])  # noqa: E731
        rows_x0 = expand(x0[:, None].expand(I, T, *x0.shape[1:]))
        rows_noise = expand(noise[:, :, None].expand(I, T, k, *noise.shape[2:]).to(device))
        rows_sigma = sigmas[:, :, None].expand(I, T, k).reshape(-1).to(device)
        adv = torch.tensor([it.advantage for _, it in chunk])[:, None, None].expand(I, T, k).reshape(-1).to(device)
        prompts = [cond_prompts[s] for ss in slots for _ in range(T) for s in ss]
        return TrainBatch(rows_x0.to(device), rows_noise.to(rows_x0.dtype), rows_sigma, self._encode(prompts), adv,
                          slots_per_item=k)

    def train_on(self, items: list[Item], latents: dict, slot_prompts: list[str], step: int) -> dict:
        """One RL step's training on its items: every inner epoch's micro-batches (loss, backward, and an optimizer
        update every grad_accum of them), then the step's logged statistics, reduced over all processes."""
        method = self.method
        latents = self._share_latents(latents)
        metrics = StepMetrics(method.term_names, self.buckets, self.bucket_names)
        for epoch in range(self.cfg.train.inner_epochs):
            micro_batches = self._micro_batches(items, latents, step, epoch)
            bar = tqdm(total=len(micro_batches), desc=f"train {step}", leave=False, disable=not self.progress,
                       unit="batch", dynamic_ncols=True)
            for micro in micro_batches:
                with self.timer("loss_backward"):
                    batch = self._batch(micro.chunk, latents, slot_prompts, step, epoch)
                    out = self._accumulate(batch, micro, metrics)
                metrics.add(out, batch.sigma, micro.weight, method.slots_per_item)
                bar.update(1)
            bar.close()
        return metrics.reduce(self.accelerator)

    def _share_latents(self, latents: dict) -> dict:
        """Items of several slots (DPO's pairs) may span processes: then every process gets every latent."""
        acc = self.accelerator
        if self.method.slots_per_item == 1 or acc.num_processes == 1:
            return latents
        latents = dict(self._gather([(j, x.cpu()) for j, x in latents.items()]))
        return {j: x.to(acc.device) for j, x in latents.items()}

    def _micro_batches(self, items: list[Item], latents: dict, step: int, epoch: int) -> list[MicroBatch]:
        """This process's items of one epoch cut into micro-batches of train.batch_size items.

        Every process runs the same number of micro-batches (DDP all-reduces each backward): the shorter ones are
        padded with zero-weight copies of an item. `real_rows` counts the real rows of the micro-batch's whole
        optimizer update over all processes, so the update's gradient is the mean over those rows."""
        acc, cfg = self.accelerator, self.cfg
        bs, accum = cfg.train.batch_size, cfg.train.grad_accum
        T, k = self.method.num_timesteps, self.method.slots_per_item
        mine, counts = self._assign(items, step, epoch)
        per_update = bs * accum
        n_micro = math.ceil(max(counts) / per_update) * accum if items else 0
        real = [1.0] * len(mine) + [0.0] * (n_micro * bs - len(mine))
        filler = mine[:1] or [(0, Item((next(iter(latents)),) * k, 0.0))]
        padded = mine + [filler[0]] * (n_micro * bs - len(mine))
        out = []
        for micro in range(n_micro):
            update = micro // accum
            lo, hi = update * per_update, (update + 1) * per_update
            real_rows = sum(min(max(c - lo, 0), hi - lo) for c in counts) * T  # all processes, this update
            weight = torch.tensor(real[micro * bs:(micro + 1) * bs], device=acc.device).repeat_interleave(T)
            out.append(MicroBatch(padded[micro * bs:(micro + 1) * bs], weight, real_rows))
        return out

    def _accumulate(self, batch: TrainBatch, micro: MicroBatch, metrics: StepMetrics):
        """The method's loss on one micro-batch and its backward; at the last micro-batch of an update, gradient
        clipping and the optimizer step, skipped (and counted) when the gradient is not finite. -> LossOutput."""
        acc = self.accelerator
        scale = acc.num_processes * self.cfg.train.grad_accum / max(micro.real_rows, 1)
        with acc.accumulate(self.ddp_model):
            with acc.autocast():
                self.method.row_weight = micro.weight  # padding rows stay out of adaptive NormGuard's statistics
                out = self.method.loss(batch, self.ddp_model, self.model)
            loss = (out.loss.float() * micro.weight).sum() * scale
            if not torch.isfinite(loss):
                metrics.count("nonfinite")
            acc.backward(loss)
            if acc.sync_gradients:
                with self.timer("optimizer"):
                    self._optimizer_step(metrics)
        return out

    def _optimizer_step(self, metrics: StepMetrics) -> None:
        grad_norm = self.accelerator.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.train.max_grad_norm)
        if grad_norm is None:  # DeepSpeed clips (and skips overflowing steps) itself
            self.optimizer.step()
            metrics.count("updates")
        elif torch.isfinite(grad_norm):
            self.optimizer.step()
            metrics.count("grad_norm", float(grad_norm))
            metrics.count("updates")
        else:  # NaN/inf anywhere (all-reduced, so every process agrees): skip this update
            metrics.count("skipped")
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self, step: int) -> Path:
        """checkpoints/step-N, atomic and trimmed to what training changes (training.checkpoint.save_checkpoint)."""
        return save_checkpoint(self.accelerator, self.run_dir, step, self.cfg.log.keep_checkpoints)

    # ------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> Summary:
        cfg, state = self.cfg, self.state
        started = time.time()
        self.setup_seconds = started - self.created
        if 0 not in state.eval_rewards:
            state.eval_rewards[0] = self.evaluate()
            self._write_grid(0)
        self.timer.discard()  # the evaluation before training belongs to no step
        checkpoint = latest_checkpoint(self.run_dir) if self.resume_from else None
        outer = tqdm(range(state.step + 1, cfg.train.steps + 1), desc=f"{cfg.method.name} steps",
                     disable=not self.progress, dynamic_ncols=True)
        for step in outer:
            t0 = time.time()
            with self.timer("rollout"):
                latents, rewards, prompt_ids, slot_prompts = self.rollout(step)
            # images whose reward is NaN/inf leave the advantages and the items (training.guards)
            items, nonfinite = finite_items(self.method, rewards, prompt_ids, group_advantages, cfg.train.adv_std)
            if items is None:
                stats = {"skipped_updates": 1.0}
                self._say(f"step {step}: skipped, every one of its {len(rewards)} rewards is NaN or inf")
            else:
                if nonfinite:
                    self._say(f"step {step}: {nonfinite} of {len(rewards)} rewards are NaN or inf; those images leave "
                              "the advantage computation")
                ng_lambda = self.method.normguard_lambda()  # the multiplier this step's loss used
                stats = self.train_on(items, latents, slot_prompts, step)
                self.method.update_normguard()  # adaptive NormGuard's dual step, once per RL step
                stats["ng_lambda"] = ng_lambda
                self.method.after_step(self.model, step)
                state.last_norm_ratio = stats["norm_ratio"]
            state.step = step
            stats["nonfinite_rewards"] = float(nonfinite)
            finite = rewards[torch.isfinite(rewards)]
            eval_reward = math.nan
            if step == cfg.train.steps or (cfg.eval.every and step % cfg.eval.every == 0):
                with self.timer("eval"):
                    eval_reward = state.eval_rewards[step] = self.evaluate()
                    self._write_grid(step)
            seconds = time.time() - t0
            reward_mean = float(finite.mean()) if len(finite) else math.nan
            self.log({"reward_mean": reward_mean, "reward_std": float(finite.std(unbiased=False)) if len(finite)
                      else math.nan, **stats, "eval_reward": eval_reward, "seconds": seconds, **self.timer.pop()},
                     step)
            outer.set_postfix(reward=f"{reward_mean:.3f}", ratio=f"{stats.get('norm_ratio', math.nan):.4f}",
                              img_s=f"{len(rewards) / seconds:.1f}", refresh=False)
            if step == cfg.train.steps or (cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0):
                with self.timer("checkpoint"):  # logged in the next row (this one is written)
                    checkpoint = self.save_checkpoint(step)
        outer.close()
        return self.finish(checkpoint, time.time() - started)

    def finish(self, checkpoint: Path | None, seconds: float) -> Summary:
        acc, state = self.accelerator, self.state
        weights = self.run_dir / "trained_weights"
        plot = self.run_dir / "plot.png"
        if acc.is_main_process:
            self.model.save_trained(str(weights))
            self.csv.finish()
            plot_run(self.csv_path, plot, title=f"{self.cfg.log.run_name}: {self.cfg.method.name}, "
                                               f"ng_lambda={self.cfg.normguard.ng_lambda}",
                     eval_before=state.eval_rewards.get(0))
        acc.end_training()
        acc.wait_for_everyone()
        last = max(state.eval_rewards)
        grids = sorted((self.run_dir / "samples").glob("step-*.png"))
        return Summary(self.run_dir, state.eval_rewards[0], state.eval_rewards[last], state.last_norm_ratio,
                       self.csv_path, plot, checkpoint or Path(""), weights, seconds, state.step, self.setup_seconds,
                       grids=[grids[0], grids[-1]] if grids else [], timing=self.timer.summary())


def _flatten(d: dict, prefix: str = "") -> dict:
    """Scalars under dotted keys (TensorBoard hparams); lists and free-form mappings become strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def train(cfg: Config, resume: bool | str = False) -> Summary:
    return Trainer(cfg, resume=resume).run()
