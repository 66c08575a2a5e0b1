#!/usr/bin/env bash
# A 3-step bf16 training smoke on a tiny on-disk SD3 pipeline: the whole trainer (`python -m training`) on the GPU
# through the same path a user's local SD3.5 folder takes (StableDiffusion3Pipeline.from_pretrained, the three
# text encoders with the prompt cache, VAE decoding, LoRA via peft, accelerate's bf16 autocast, NFT + NormGuard
# through the Triton kernels, checkpoint and LoRA export), in about half a minute.
#
#   bash benchmarks/gpu_train_smoke.sh [--cpu] [RUN_DIR]
#
# The pipeline is written by tests/training/tiny_pipelines.py (random weights, local tokenizers, no download)
# into a temporary folder. The run goes to RUN_DIR (default: a temporary folder, removed at the end). After the
# run, the per-step metrics are printed and checked: 3 steps logged, finite loss and norm ratio, no skipped
# update. Exit code: 0 when all of that holds, 2 without a CUDA device (unless --cpu) or without diffusers,
# otherwise the trainer's or the check's non-zero code.
# --cpu is the rehearsal: the same run on this machine's CPU (ACCELERATE_USE_CPU), also in bf16.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET NGKERNELS_BACKEND  # CUDA runs the compiled kernels, the CPU the torch backend

device=cuda
if [ "${1:-}" = "--cpu" ]; then device=cpu; shift; fi
if [ "$device" = cuda ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA device: gpu_train_smoke.sh is for a GPU machine (rehearse with --cpu)" >&2; exit 2; }
else
  export ACCELERATE_USE_CPU=true
fi
python -c "import diffusers" 2>/dev/null \
  || { echo "error: diffusers is not importable: install the wheels of scripts/fetch_gpu_wheels.sh (.whl/)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run_root=${1:-$work/runs}
mkdir -p "$run_root"
start=$SECONDS

python - "$work/sd3" <<'PY' || { echo "error: could not write the tiny SD3 pipeline" >&2; exit 1; }
import sys
from tests.training.tiny_pipelines import save_tiny_sd3_pipeline
print("tiny SD3 pipeline:", save_tiny_sd3_pipeline(sys.argv[1]))
PY

# 32 px images -> [4, 16, 16] latents; 2 prompts x 2 images, 2 sampler steps, NFT on 2 timesteps, NormGuard on;
# the reward is the offline colourfulness (no scorer to load).
overrides=(
  model.type=sd3 "model.path=$work/sd3" model.dtype=bfloat16 model.resolution=32 model.max_sequence_length=8
  model.free_text_encoders=true
  "rollout.prompts=[a red cat, a blue dog]" rollout.prompts_per_step=2 rollout.group_size=2 rollout.batch_size=4
  sampling.num_steps=2 sampling.shift=3.0 reward.name=colorfulness
  method.name=nft method.nft.num_timesteps=2 normguard.ng_lambda=0.1 normguard.relative=true
  train.steps=3 train.batch_size=4 train.mixed_precision=bf16
  eval.every=0 eval.num_prompts=2 eval.samples_per_prompt=1
  "log.output_dir=$run_root" log.run_name=smoke log.trackers=[csv] log.progress=false log.checkpoint_every=0
)
echo "=== python -m training ${overrides[*]}"
python -m training "${overrides[@]}"
rc=$?
[ $rc -ne 0 ] && { echo "error: python -m training exited with $rc" >&2; exit $rc; }

python - "$run_root/smoke" "$device" <<'PY'
import csv, math, sys
from pathlib import Path

run_dir, device = Path(sys.argv[1]), sys.argv[2]
files = sorted(run_dir.rglob("*.csv"))
rows = []
for f in files:
    with open(f, newline="") as fh:
        found = [r for r in csv.DictReader(fh) if "loss" in r and r.get("step", "").isdigit()]
    if found:
        rows = found
        print(f"per-step metrics ({f.relative_to(run_dir)}):")
        break
keys = [k for k in ("step", "loss", "normguard", "norm_ratio", "grad_norm", "reward_mean", "skipped_updates", "seconds")
        if rows and k in rows[0]]
for r in rows:
    print("  " + ", ".join(f"{k}={r[k]}" for k in keys))
steps = sorted({int(r["step"]) for r in rows})
problems = []
if steps != [1, 2, 3]:
    problems.append(f"expected steps 1, 2, 3 in the metrics, found {steps}")
for r in rows:
    for k in ("loss", "norm_ratio"):
        if k in r and not math.isfinite(float(r[k])):
            problems.append(f"step {r['step']}: {k} = {r[k]}")
    for k in ("skipped_updates", "nonfinite_losses"):
        if float(r.get(k, 0) or 0) != 0:
            problems.append(f"step {r['step']}: {k} = {r[k]}")
if problems:
    print("error: " + "; ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"smoke OK on {device}: {len(steps)} bf16 steps, finite loss and norm ratio, no skipped update")
PY
rc=$?
echo "=== gpu_train_smoke: exit $rc after $((SECONDS - start)) s"
exit $rc
