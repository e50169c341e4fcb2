"""Time and peak memory of one CTRL fine-tuning step on a Stable Diffusion 1.5-sized UNet (random weights).

One step = :func:`ctrl_bio.objective.pathwise_loss` (Euler-Maruyama from noise to latents with classifier-free text
guidance, the Girsanov KL, a reward through the VAE decoder and a small image CNN), backward, and an Adam step on the
label pathway (label embedding + LoRA). Two memory regimes of the pathwise estimator (CTRL, Zhao et al. 2024;
DESIGN.md) are compared:

- ``checkpoint``: the exact gradient through every sampler step; each step's activations are recomputed in the
  backward pass (memory flat in the number of steps), and inside a step the UNet's own blocks are checkpointed too
  (``--unet-checkpointing``, on by default);
- ``truncate``: the gradient through the last step only (``grad_last_k=1``, DRaFT-1, Clark et al. 2024).

The UNet is built from SD-1.5's ``unet/config.json`` (859.5M parameters) and the VAE from its ``vae/config.json``,
both with random weights: timing and memory do not depend on the weight values, and nothing is downloaded. Latents
are 4x64x64 (512x512 images). Each mode runs in its own subprocess so that its peak memory is its own (CUDA: peak
allocated by torch; CPU: peak resident set size of the process).

Recorded numbers. The GPU numbers (the point of this script) are not yet recorded: the session that wrote it had no
GPU. At full SD-1.5 size it has run end to end on a CPU only (fp32, one thread, LoRA rank 4, w = 7.5, batch 1, UNet
and VAE checkpointing on; a second job shared the two cores, so the times are rough):

    --cpu --modes truncate   --steps 1 --repeats 1   135.4 s/step   peak RSS 11.2 GiB
    --cpu --modes checkpoint --steps 2 --repeats 1   266.6 s/step   peak RSS 12.6 GiB

``--tiny`` (a tiny UNet and VAE, latents 4x8x8) checks the script end to end on a CPU in seconds; its numbers say
nothing about Stable Diffusion.

    python benchmarks/images/sd_step_timing.py                   # SD-1.5 size, CUDA if available
    python benchmarks/images/sd_step_timing.py --tiny --steps 4  # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from ctrl_bio.objective import pathwise_loss  # noqa: E402
from ctrl_bio.reward import CalibratedClassifier  # noqa: E402
from domains.images.stable_diffusion import (  # noqa: E402
    TINY_UNET,
    CompressibilityCNN,
    LatentDecoder,
    SDLatentScore,
    latent_reward,
    sde_from_scheduler,
)
from domains.images.unet import UNetAugmentedScore  # noqa: E402

#: runwayml/stable-diffusion-v1-5 ``unet/config.json`` (the keys that differ from diffusers' defaults included).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}
#: Its ``vae/config.json``.
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16,
}
#: Its scheduler (PNDM, scaled_linear): only the training schedule matters here.
SD15_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "num_train_timesteps": 1000, "prediction_type": "epsilon"}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(args: argparse.Namespace, device: torch.device) -> tuple[UNetAugmentedScore, object, tuple[int, ...]]:
    """The augmented model and the reward of one CTRL step, on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET)).to(device)
    vae = AutoencoderKL(**(TINY_VAE if args.tiny else SD15_VAE)).to(device)
    text_len, text_dim = (8, unet.config.cross_attention_dim) if args.tiny else (77, 768)
    cond, uncond = torch.randn(2, 1, text_len, text_dim, device=device)  # stand-ins for CLIP text states
    autocast = DTYPES[args.dtype]
    score = SDLatentScore(unet, sde_from_scheduler(SD15_SCHEDULE), cond, uncond, guidance_scale=args.guidance,
                          gradient_checkpointing=args.unet_checkpointing, autocast_dtype=autocast)
    model = UNetAugmentedScore(score, (4,), lora_rank=args.lora_rank).to(device)
    classifier = CalibratedClassifier(CompressibilityCNN(), temperature=1.0).to(device)
    decoder = LatentDecoder(vae, gradient_checkpointing=args.unet_checkpointing, autocast_dtype=autocast)
    return model, latent_reward(decoder, [classifier]), score.x_shape


def run_mode(args: argparse.Namespace) -> dict:
    """One warm-up step and ``--repeats`` timed steps of one memory mode; returns its record."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, reward, x_shape = build(args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-4)
    y = torch.arange(args.batch_size, device=device).remainder(4).unsqueeze(1)
    memory = "truncate" if args.mode == "truncate" else "checkpoint"

    def step(seed: int) -> dict:
        opt.zero_grad(set_to_none=True)
        est = pathwise_loss(model, model.score.sde, reward, y, x_shape, n_steps=args.steps, memory=memory,
                            grad_last_k=1, spacing="quadratic", generator=torch.Generator().manual_seed(seed))
        est.loss.backward()
        opt.step()
        return {"loss": float(est.loss), "kl": float(est.kl)}

    step(0)  # warm-up: allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.repeats):
        last = step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeats
    if device.type == "cuda":
        peak_gib, peak_kind = torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    else:  # Linux reports ru_maxrss in KiB
        peak_gib, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"
    return {
        "mode": args.mode, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tiny": args.tiny, "batch_size": args.batch_size, "sampler_steps": args.steps, "dtype": args.dtype,
        "unet_checkpointing": args.unet_checkpointing, "lora_rank": args.lora_rank, "guidance": args.guidance,
        "unet_params_M": sum(p.numel() for n, p in model.score.unet.named_parameters() if "lora_" not in n) / 1e6,
        "trainable_params": sum(p.numel() for p in trainable),
        "seconds_per_step": seconds, "peak_memory_gib": peak_gib, "peak_memory_kind": peak_kind, **last,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet and VAE (a CPU smoke test)")
    parser.add_argument("--modes", nargs="+", default=["checkpoint", "truncate"], choices=["checkpoint", "truncate"])
    parser.add_argument("--mode", choices=["checkpoint", "truncate"], help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per CTRL step")
    parser.add_argument("--repeats", type=int, default=2, help="timed CTRL steps (after one warm-up step)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype; default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--no-unet-checkpointing", dest="unet_checkpointing", action="store_false")
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where CUDA is available")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() and not args.cpu else "fp32"

    if args.mode is not None:  # child: one mode, one JSON line
        print(json.dumps(run_mode(args)))
        return
    records = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        records.append(json.loads(out.strip().splitlines()[-1]))
    print("| mode | device | batch | steps | dtype | s/step | peak GiB | kind |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['mode']} | {r['device']}{' (tiny)' if r['tiny'] else ''} | {r['batch_size']} | "
              f"{r['sampler_steps']} | {r['dtype']} | {r['seconds_per_step']:.3f} | {r['peak_memory_gib']:.3f} | "
              f"{r['peak_memory_kind']} |")
    if args.out is not None:
        args.out.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
