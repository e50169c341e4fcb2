"""Stable Diffusion as CTRL's pre-trained model: latent score, rewards through the VAE, adapters, pipeline sampling.

CTRL (Zhao et al. 2024, "Adding Conditional Control to Diffusion Models with Reinforcement Learning", Sec. 6)
fine-tunes Stable Diffusion 1.5 for new labels (JPEG compressibility classes, aesthetic quality) for a fixed
prompt. In DESIGN.md's convention this is:

- the pre-trained model: SD's frozen ``UNet2DConditionModel`` on latents x of shape (4, H/8, W/8), with the prompt
  and classifier-free text guidance folded in (:class:`SDLatentScore`); its DDPM schedule, any beta schedule, is a
  :class:`ctrl_bio.sde.DiscreteScheduleSDE` (:func:`sde_from_scheduler`), and its epsilon, v or sample prediction
  becomes the score (s = -eps(x, t N - 1) / sigma_t for epsilon; :mod:`ctrl_bio.interop`);
- the augmented model: :class:`domains.images.unet.UNetAugmentedScore` on that score, unchanged (a zero-initialised
  label embedding as the UNet's ``class_embedding``, optional LoRA);
- the reward log p(y | x_0): a classifier on decoded images, differentiated through the VAE decoder
  (:class:`DecodedLogProb`, :func:`latent_reward`), as in DRaFT / AlignProp;
- the exact compressibility label :func:`jpeg_kb_class` and two reward models that load from local folders:
  :class:`CompressibilityCNN` (4 JPEG-size classes) and :class:`AestheticClassifier` (CLIP ViT-L/14 image embedding
  -> LAION-aesthetic-style :class:`AestheticMLP`), both temperature-calibrated (Guo et al. 2017);
- a fine-tuned model saved as a small folder next to (and referring to) the untouched pipeline
  (:func:`save_adapter`, :func:`load_adapter`, :func:`load_finetuned`), sampled with a normal pipeline call under
  :func:`requested_labels`.

Everything loads from local paths (``local_files_only=True``); nothing here downloads weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn import functional as F

from ctrl_bio.interop import canonical_prediction, score_from_prediction
from ctrl_bio.interop import sde_from_scheduler as core_sde_from_scheduler
from ctrl_bio.lora import ADAPTER_NAME, lora_disabled
from ctrl_bio.model import NULL_LABEL, check_labels
from ctrl_bio.reward import CalibratedClassifier, LogLikelihoodReward
from ctrl_bio.sde import DiscreteScheduleSDE
from domains.images.data import jpeg_bytes
from domains.images.unet import LORA_TARGETS, UNetAugmentedScore

#: Pipeline components CTRL needs; each must be a sub-folder of a diffusers pipeline folder.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: Files of a saved fine-tuned model (beside, never inside, the pipeline's own folder): the label embedding and
#: settings, and the LoRA part in peft's adapter format (which peft and diffusers' ``load_lora_adapter`` read).
ADAPTER_WEIGHTS = "ctrl_adapter.safetensors"
ADAPTER_CONFIG = "ctrl_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
#: Files of a saved reward model.
REWARD_WEIGHTS = "model.safetensors"
REWARD_CONFIG = "config.json"


# --------------------------------------------------------------------------------------------------------------------
# The schedule


def sde_from_scheduler(scheduler: Any) -> DiscreteScheduleSDE:
    """The SDE of a diffusers scheduler's training schedule: alpha_{(n+1)/N}^2 = ``scheduler.alphas_cumprod[n]``.

    Any beta schedule (:func:`ctrl_bio.interop.sde_from_scheduler`); the prediction type is read separately
    (:func:`prediction_type`), so an epsilon, v- or sample-predicting UNet all give the score.
    """
    return core_sde_from_scheduler(scheduler)


def prediction_type(scheduler: Any) -> str:
    """What the scheduler's UNet predicts: ``epsilon``, ``v_prediction`` or ``sample`` (its config; default epsilon)."""
    cfg = getattr(scheduler, "config", {})
    value = cfg.get("prediction_type", None) if hasattr(cfg, "get") else getattr(cfg, "prediction_type", None)
    return value or "epsilon"


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: {path}")


def load_pipeline(path: str | Path, *, torch_dtype: torch.dtype | None = None, load_safety_checker: bool = False,
                  **kwargs: Any) -> Any:
    """A ``StableDiffusionPipeline`` from a local diffusers folder (never downloads).

    Args:
        path: a folder written by ``save_pretrained`` (``model_index.json`` plus one sub-folder per component).
        torch_dtype: weights' dtype (e.g. ``torch.float16`` on a GPU); None keeps float32.
        load_safety_checker: False (default) loads no safety checker: it would replace flagged images by black ones,
            which a reward must never see.
        **kwargs: passed to ``from_pretrained``.

    Raises:
        FileNotFoundError: one line naming the missing folder, ``model_index.json`` or component.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.is_dir():
        raise _missing(path, "Stable Diffusion pipeline folder")
    if not (path / "model_index.json").is_file():
        raise _missing(path / "model_index.json", "pipeline index (not a diffusers pipeline folder)")
    for name in REQUIRED_COMPONENTS:
        if not (path / name).is_dir():
            raise _missing(path / name, f"pipeline component {name!r}")
    if not load_safety_checker:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        return StableDiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as err:  # huggingface_hub's long multi-line errors: keep one line, name the path
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"could not load Stable Diffusion pipeline from {path}: {first}") from None


# --------------------------------------------------------------------------------------------------------------------
# The pre-trained score


def adapter_state_checkpoint(module: nn.Module, *args: Any) -> Any:
    """diffusers' block checkpointing (non-reentrant) with the recomputation under the forward's adapter state.

    CTRL's augmented model evaluates the same UNet with its LoRA adapters on (s_theta) and off (s_pre). Plain
    checkpointing recomputes a block in the backward pass under whatever the adapters' state is then (on), so the
    s_pre pass would be recomputed with LoRA and torch stops with a CheckpointError. Here each block's peft layers
    are put back into the state they had during the forward for its recomputation.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    forward_state = [m.disable_adapters for m in layers]

    def run(*inputs: Any) -> Any:
        now = [m.disable_adapters for m in layers]
        for m, off in zip(layers, forward_state):
            if m.disable_adapters != off:
                m.enable_adapters(not off)
        try:
            return module(*inputs)
        finally:
            for m, off in zip(layers, now):
                if m.disable_adapters != off:
                    m.enable_adapters(not off)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class SDLatentScore(nn.Module):
    """SD's frozen text-conditional UNet as a score network on latents, for one fixed prompt.

    out = out_uncond + w (out_text - out_uncond) exactly as ``StableDiffusionPipeline`` computes it (one UNet call on
    the batch [uncond; text]), at the scheduler timestep ``sde.timestep(t)``; then the score of that prediction (for
    epsilon s = -eps / sigma_t; v and sample predictions are linear in the same outputs, so guidance combines them
    alike). With w <= 1 the pipeline does no guidance and neither does this (one call on the text half).

    Args:
        unet: the pipeline's ``UNet2DConditionModel`` (kept as ``unet``, which :class:`UNetAugmentedScore` augments).
        sde: the UNet's training schedule (:func:`sde_from_scheduler`).
        prompt_embeds: text encoder states of the prompt, (1, L, D).
        negative_prompt_embeds: those of the negative (or empty) prompt, (1, L, D); needed when w > 1.
        guidance_scale: w.
        gradient_checkpointing: recompute the UNet's blocks in backward (diffusers' own checkpointing, with
            :func:`adapter_state_checkpoint` so that LoRA's on/off passes recompute as they ran).
        autocast_dtype: run the UNet under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on a GPU);
            None: the UNet's own dtype. The score is returned in the input's dtype.
        prediction_type: what the UNet predicts, ``epsilon``, ``v_prediction`` or ``sample`` (:func:`prediction_type`
            of the pipeline's scheduler).
    """

    def __init__(self, unet: nn.Module, sde: DiscreteScheduleSDE, prompt_embeds: Tensor,
                 negative_prompt_embeds: Tensor | None = None, *, guidance_scale: float = 7.5,
                 gradient_checkpointing: bool = False, autocast_dtype: torch.dtype | None = None,
                 prediction_type: str = "epsilon"):
        super().__init__()
        if not isinstance(sde, DiscreteScheduleSDE):
            raise TypeError(f"SDLatentScore needs a DiscreteScheduleSDE (the UNet's timesteps), "
                            f"got {type(sde).__name__}")
        self.prediction_type = canonical_prediction(prediction_type)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"prompt_embeds must have shape (1, L, D) (one prompt), got {tuple(prompt_embeds.shape)}")
        self.guidance_scale = float(guidance_scale)
        if self.do_guidance and negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale {guidance_scale} > 1 needs negative_prompt_embeds (the empty prompt's)")
        self.unet, self.sde, self.autocast_dtype = unet, sde, autocast_dtype
        # Buffers: they follow .to(device) but are neither parameters nor saved in a state dict.
        self.register_buffer("prompt_embeds", prompt_embeds.detach(), persistent=False)
        neg = negative_prompt_embeds.detach() if negative_prompt_embeds is not None else prompt_embeds.detach()
        self.register_buffer("negative_prompt_embeds", neg, persistent=False)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing(adapter_state_checkpoint)

    @classmethod
    def from_pipeline(cls, pipe: Any, prompt: str, negative_prompt: str | None = None, *, guidance_scale: float = 7.5,
                      **kwargs: Any) -> SDLatentScore:
        """The score of ``pipe``'s UNet for ``prompt``, text encoded once by the pipeline's own ``encode_prompt``."""
        w = float(guidance_scale)
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, w > 1.0, negative_prompt)
        kwargs.setdefault("prediction_type", prediction_type(pipe.scheduler))
        return cls(pipe.unet, sde_from_scheduler(pipe.scheduler), cond, uncond, guidance_scale=w, **kwargs)

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def x_shape(self) -> tuple[int, int, int]:
        """Shape of one latent, (C, H/8, W/8) at the UNet's native resolution."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (int(cfg.in_channels), int(size), int(size))

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        timesteps = self.sde.timestep(t)
        if self.do_guidance:
            x_in, timesteps = torch.cat([x, x]), torch.cat([timesteps, timesteps])
            text = torch.cat([self.negative_prompt_embeds.expand(b, -1, -1), self.prompt_embeds.expand(b, -1, -1)])
            if class_labels is not None:  # the label conditions both halves, as in the pipeline (requested_labels)
                class_labels = torch.cat([class_labels, class_labels])
        else:
            x_in, text = x, self.prompt_embeds.expand(b, -1, -1)
        dtype = self.unet.dtype
        ctx = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else nullcontext())
        with ctx:
            out = self.unet(x_in.to(dtype), timesteps, encoder_hidden_states=text.to(dtype),
                            class_labels=class_labels, return_dict=False)[0]
        out = out.to(x.dtype)
        if self.do_guidance:
            out_uncond, out_text = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_text - out_uncond)
        return score_from_prediction(out, x, t.expand(b) if t.ndim == 0 else t, self.sde, self.prediction_type)


# --------------------------------------------------------------------------------------------------------------------
# Rewards through the VAE decoder


class LatentDecoder(nn.Module):
    """Latents z -> images ``vae.decode(z / scaling_factor).sample`` in [-1, 1], (B, 3, 8h, 8w); differentiable.

    Clamped to [-1, 1] like the pipeline's own post-processing, so that the reward scores the image the user gets.

    Args:
        vae: the pipeline's ``AutoencoderKL`` (frozen in place).
        gradient_checkpointing: recompute the decoder's blocks in backward (a 512x512 decode is the largest
            activation of a CTRL step).
        autocast_dtype: decode under ``torch.autocast`` with this dtype; None: the VAE's own dtype.
    """

    def __init__(self, vae: nn.Module, *, gradient_checkpointing: bool = False,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.vae = vae.requires_grad_(False)
        self.autocast_dtype = autocast_dtype
        if gradient_checkpointing:
            vae.enable_gradient_checkpointing()

    def forward(self, z: Tensor) -> Tensor:
        cfg = self.vae.config
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        ctx = (torch.autocast(z.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else nullcontext())
        with ctx:
            images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return images.float().clamp(-1.0, 1.0)


class DecodedLogProb(nn.Module):
    """log p(y | decode(z)) for latents z: an image classifier composed with the VAE decoder.

    A ``log_prob_fn`` of :class:`ctrl_bio.reward.LogLikelihoodReward`: (B, 4, h, w) -> (B, n_classes). Gradients flow
    through the decoder into the latents (CTRL's pathwise estimator needs them).
    """

    def __init__(self, decoder: LatentDecoder, classifier: nn.Module):
        super().__init__()
        self.decoder, self.classifier = decoder, classifier.requires_grad_(False)

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(self.decoder(z))


def latent_reward(decoder: LatentDecoder, classifiers: Sequence[nn.Module]) -> LogLikelihoodReward:
    """r(z, y) = sum_k log p_k(y_k | decode(z)) (CTRL Sec. 5: labels independent given the image).

    Each classifier maps images in [-1, 1] (B, 3, H, W) to calibrated log-probabilities. Each label decodes the
    latents again; with several labels on a GPU, prefer one classifier returning all heads.
    """
    return LogLikelihoodReward([DecodedLogProb(decoder, c) for c in classifiers])


# --------------------------------------------------------------------------------------------------------------------
# The exact compressibility label

#: Pillow JPEG quality of the compressibility label (DDPO's ``jpeg_compressibility``, which CTRL's task follows).
JPEG_QUALITY = 95
#: Class edges in kB (1 kB = 1000 bytes, as DDPO): class 0 > 110, 1 in (85, 110], 2 in (60, 85], 3 <= 60.
JPEG_CLASS_EDGES_KB = (110.0, 85.0, 60.0)
JPEG_CLASS_NAMES = (">110kB", "85-110kB", "60-85kB", "<60kB")


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as diffusers' image processor does."""
    x = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def jpeg_kb(images_uint8: np.ndarray | Tensor, quality: int = JPEG_QUALITY) -> np.ndarray:
    """JPEG size in kB of each RGB image (B, H, W, 3) uint8 (or one (H, W, 3)), Pillow baseline at ``quality``.

    :func:`domains.images.data.jpeg_bytes` (fixed encoder settings: 4:2:0 subsampling, no optimised Huffman tables)
    in kB of 1000 bytes, as DDPO counts them.
    """
    u8 = images_uint8.cpu().numpy() if isinstance(images_uint8, Tensor) else np.asarray(images_uint8)
    if u8.ndim == 3:
        u8 = u8[None]
    if u8.dtype != np.uint8 or u8.ndim != 4 or u8.shape[-1] != 3:
        raise ValueError(f"jpeg_kb needs uint8 RGB images of shape (B, H, W, 3), got {u8.dtype} {u8.shape}")
    return jpeg_bytes(u8, quality) / 1000.0


def jpeg_kb_class(images_uint8: np.ndarray | Tensor, quality: int = JPEG_QUALITY) -> np.ndarray:
    """The exact compressibility class of CTRL's SD experiment: 0 (>110 kB), 1 (85-110), 2 (60-85), 3 (<60)."""
    kb = jpeg_kb(images_uint8, quality)
    return (kb[:, None] <= np.asarray(JPEG_CLASS_EDGES_KB)[None, :]).sum(axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# Reward models, saved as a folder: model.safetensors + config.json {"class", "config", "temperature"}


@dataclass
class CompressibilityConfig:
    """A small strided CNN on images in [-1, 1]: one stride-2 conv per width, global average pool, linear head."""

    in_channels: int = 3
    channels: tuple[int, ...] = (16, 32, 64, 64)
    n_classes: int = len(JPEG_CLASS_NAMES)


class CompressibilityCNN(nn.Module):
    """Logits of the 4 JPEG-size classes (:func:`jpeg_kb_class`) of an image in [-1, 1], (B, 3, H, W)."""

    def __init__(self, config: CompressibilityConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = config or CompressibilityConfig(**kwargs)
        layers: list[nn.Module] = []
        width = self.config.in_channels
        for c in self.config.channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            width = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, self.config.n_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.body(images))


@dataclass
class AestheticConfig:
    """LAION aesthetic predictor v2's MLP (improved-aesthetic-predictor) on L2-normalised CLIP image embeddings."""

    input_dim: int = 768
    hidden: tuple[int, ...] = (1024, 128, 64, 16)
    dropout: tuple[float, ...] = (0.2, 0.2, 0.1, 0.0)
    threshold: float = 5.7


class AestheticMLP(nn.Module):
    """Aesthetic score (a 1-10 rating regressor) of a CLIP image embedding, (B, input_dim) -> (B,)."""

    def __init__(self, config: AestheticConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = config or AestheticConfig(**kwargs)
        layers: list[nn.Module] = []
        width = self.config.input_dim
        for h, p in zip(self.config.hidden, self.config.dropout):
            layers += [nn.Linear(width, h), nn.Dropout(p)]
            width = h
        self.layers = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


def aesthetic_logits(score: Tensor, threshold: float) -> Tensor:
    """Binary logits [0, score - threshold]: softmax(. / T) gives p(aesthetic) = sigmoid((score - threshold) / T).

    So that :func:`ctrl_bio.reward.fit_temperature` calibrates the binary label (class 1: score >= threshold).
    """
    return torch.stack([torch.zeros_like(score), score - threshold], dim=-1)


REWARD_CLASSES: dict[str, tuple[type[nn.Module], type]] = {
    "CompressibilityCNN": (CompressibilityCNN, CompressibilityConfig),
    "AestheticMLP": (AestheticMLP, AestheticConfig),
}


def save_reward_model(net: CompressibilityCNN | AestheticMLP, path: str | Path, temperature: float = 1.0) -> Path:
    """Write ``net`` and its calibration temperature (from :func:`ctrl_bio.reward.fit_temperature`) to a folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path / REWARD_WEIGHTS))
    meta = {"class": type(net).__name__, "config": asdict(net.config), "temperature": float(temperature)}
    (path / REWARD_CONFIG).write_text(json.dumps(meta, indent=2))
    return path


def load_reward_model(path: str | Path) -> tuple[nn.Module, float]:
    """(network in eval mode, temperature) from a folder written by :func:`save_reward_model`."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in (path / REWARD_CONFIG, path / REWARD_WEIGHTS):
        if not f.is_file():
            raise _missing(f, "reward model file")
    meta = json.loads((path / REWARD_CONFIG).read_text())
    if meta.get("class") not in REWARD_CLASSES:
        raise ValueError(f"{path / REWARD_CONFIG}: unknown reward model class {meta.get('class')!r}, "
                         f"expected one of {sorted(REWARD_CLASSES)}")
    cls, config_cls = REWARD_CLASSES[meta["class"]]
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    net = cls(config_cls(**config))
    net.load_state_dict(load_file(str(path / REWARD_WEIGHTS)))
    return net.eval().requires_grad_(False), float(meta.get("temperature", 1.0))


def load_compressibility_classifier(path: str | Path) -> CalibratedClassifier:
    """A calibrated :class:`CompressibilityCNN`: images in [-1, 1] -> log p(class), (B, 4)."""
    net, temperature = load_reward_model(path)
    if not isinstance(net, CompressibilityCNN):
        raise ValueError(f"{path}: holds a {type(net).__name__}, not a CompressibilityCNN")
    return CalibratedClassifier(net, temperature).requires_grad_(False)


#: OpenAI CLIP's pixel normalisation, used when the CLIP folder has no ``preprocessor_config.json``.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_clip_vision(path: str | Path) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """(``CLIPVisionModelWithProjection``, image mean, image std) from a local transformers folder."""
    from transformers import CLIPVisionModelWithProjection

    path = Path(path)
    if not (path / "config.json").is_file():
        raise _missing(path, "CLIP model folder (with config.json)")
    try:
        clip = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"could not load CLIP from {path}: {first}") from None
    mean, std = CLIP_MEAN, CLIP_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return clip.eval().requires_grad_(False), mean, std


class AestheticClassifier(nn.Module):
    """log p(aesthetic | image) for images in [-1, 1]: CLIP image embedding -> :class:`AestheticMLP` -> calibrated
    binary label at the score threshold (5.7), log p(1) = log sigmoid((score - 5.7) / T). Differentiable, including
    CLIP's pre-processing (bicubic resize of the short side and centre crop, done in torch).

    Args:
        clip: a ``CLIPVisionModelWithProjection`` (``image_embeds`` of width ``mlp.config.input_dim``).
        mlp: the score regressor.
        temperature: T, fitted with :func:`ctrl_bio.reward.fit_temperature` on :func:`aesthetic_logits`.
    """

    def __init__(self, clip: nn.Module, mlp: AestheticMLP, temperature: float = 1.0,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD):
        super().__init__()
        self.clip, self.mlp = clip.requires_grad_(False), mlp.requires_grad_(False)
        self.size = int(clip.config.image_size)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] (B, 3, H, W) -> CLIP's normalised (B, 3, size, size)."""
        x = (images + 1.0) / 2.0
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    def score(self, images: Tensor) -> Tensor:
        """The aesthetic score of each image, (B,)."""
        embeds = self.clip(pixel_values=self.preprocess(images)).image_embeds
        return self.mlp(F.normalize(embeds.float(), dim=-1))

    def forward(self, images: Tensor) -> Tensor:
        logits = aesthetic_logits(self.score(images), self.mlp.config.threshold)
        return F.log_softmax(logits / self.temperature, dim=-1)


def load_aesthetic_classifier(mlp_path: str | Path, clip_path: str | Path) -> AestheticClassifier:
    """An :class:`AestheticClassifier` from a reward folder (:func:`save_reward_model`) and a local CLIP folder."""
    mlp, temperature = load_reward_model(mlp_path)
    if not isinstance(mlp, AestheticMLP):
        raise ValueError(f"{mlp_path}: holds a {type(mlp).__name__}, not an AestheticMLP")
    clip, mean, std = load_clip_vision(clip_path)
    return AestheticClassifier(clip, mlp, temperature, mean, std)


# --------------------------------------------------------------------------------------------------------------------
# Saving, loading and sampling a fine-tuned model


def _trainable_state(model: UNetAugmentedScore) -> dict[str, Tensor]:
    """The label pathway by parameter name: the label embedding and the LoRA matrices (what the model trains)."""
    return {n: p for n, p in model.named_parameters() if n.startswith("embedding.") or "lora_" in n}


def _lora_layout(unet: nn.Module) -> tuple[float | None, list[str]]:
    """(lora_alpha, full names of the modules that carry the ``ctrl`` adapter) of an augmented UNet.

    Full module names are exact peft targets (a target matches a module whose name ends with it), so the same
    layers get adapters on reload whatever targets the model was built with.
    """
    from peft.tuners.lora import LoraLayer

    alpha, names = None, []
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_alpha:
            alpha = float(module.lora_alpha[ADAPTER_NAME])
            names.append(name)
    return alpha, names


def save_adapter(model: UNetAugmentedScore, folder: str | Path, *, base_model: str | Path | None = None,
                 label_names: Sequence[str] | None = None, class_names: Sequence[Sequence[str]] | None = None,
                 prompt: str | None = None, guidance_scale: float | None = None) -> Path:
    """Write the label pathway of a fine-tuned SD model into ``folder``.

    ``ctrl_adapter.safetensors`` holds the label embedding and ``ctrl_config.json`` the settings; the LoRA part is
    written in peft's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``, with the LoRA settings
    also in the weights' header, where diffusers' ``unet.load_lora_adapter(folder, prefix=None,
    weight_name="adapter_model.safetensors")`` reads them). The pipeline's own files are not copied: ``base_model``
    (a local pipeline folder, recorded relative to ``folder`` so that both move together, or a Hub id) says where
    they are (:func:`load_finetuned`).
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    names = list(label_names) if label_names is not None else [f"label{k}" for k in range(len(model.n_classes))]
    if len(names) != len(model.n_classes):
        raise ValueError(f"label_names has {len(names)} names for {len(model.n_classes)} labels")
    folder.mkdir(parents=True, exist_ok=True)
    embedding = {f"embedding.{k}": v.detach().contiguous().cpu() for k, v in model.embedding.state_dict().items()}
    save_file(embedding, str(folder / ADAPTER_WEIGHTS))
    base = _base_reference(base_model, folder)
    alpha, targets = _lora_layout(model.score.unet) if model.lora_rank > 0 else (None, [])
    if model.lora_rank > 0:
        lora = LoraConfig(r=model.lora_rank, lora_alpha=alpha, target_modules=targets, base_model_name_or_path=base)
        lora.save_pretrained(str(folder))
        header = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.to_dict().items()}
        state = get_peft_model_state_dict(model.score.unet, adapter_name=ADAPTER_NAME)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / PEFT_WEIGHTS),
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(header, sort_keys=True)})
    meta = {
        "format": "ctrl-bio stable diffusion adapter", "version": 2,
        "base_model": base, "n_classes": list(model.n_classes), "label_names": names,
        "class_names": [list(c) for c in class_names] if class_names is not None else None,
        "lora_rank": model.lora_rank, "lora_alpha": alpha, "lora_targets": targets or None,
        "prompt": prompt, "guidance_scale": guidance_scale,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
    return folder


def _base_reference(base_model: str | Path | None, folder: Path) -> str | None:
    """The pipeline as the adapter records it: relative to the adapter folder if local, else as given (a Hub id)."""
    if base_model is None:
        return None
    if Path(base_model).is_dir():
        return Path(os.path.relpath(Path(base_model).resolve(), folder.resolve())).as_posix()
    return str(base_model)


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """The JSON of a saved adapter folder."""
    folder = Path(folder)
    for f in (folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS):
        if not f.is_file():
            raise _missing(f, "CTRL adapter file")
    return json.loads((folder / ADAPTER_CONFIG).read_text())


class _UNetHolder(nn.Module):
    """A bare UNet in the shape :class:`UNetAugmentedScore` augments (``.unet``), for pipeline-only sampling."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet


def load_adapter(target: Any, folder: str | Path) -> UNetAugmentedScore:
    """Attach a saved label pathway to ``target``'s UNet (LoRA injected in place) and return the augmented model.

    Args:
        target: an :class:`SDLatentScore` (the model then scores and fine-tunes further) or a pipeline
            (``target.unet``; enough for sampling with :func:`requested_labels`).
        folder: written by :func:`save_adapter`.
    """
    from safetensors.torch import load_file

    meta = read_adapter_config(folder)
    score = target if isinstance(target, SDLatentScore) else _UNetHolder(target.unet)
    model = UNetAugmentedScore(score, meta["n_classes"], lora_rank=int(meta["lora_rank"]),
                               lora_alpha=meta.get("lora_alpha"),
                               lora_targets=meta.get("lora_targets") or LORA_TARGETS)
    saved = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    if (Path(folder) / PEFT_WEIGHTS).is_file():  # version 2: the LoRA part in peft's format, under peft's names
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.score.unet, load_file(str(Path(folder) / PEFT_WEIGHTS)),
                                           adapter_name=ADAPTER_NAME)
        mismatched = list(result.unexpected_keys) + [k for k in result.missing_keys if "lora_" in k]
        if mismatched:
            raise ValueError(f"{Path(folder) / PEFT_WEIGHTS} does not fit this UNet: {len(mismatched)} mismatched "
                             f"tensors, e.g. {mismatched[0]!r}")
        expected = {n: p for n, p in _trainable_state(model).items() if n.startswith("embedding.")}
    else:  # version 1: embedding and LoRA together
        expected = _trainable_state(model)
    if set(saved) != set(expected):
        diff = sorted(set(saved) ^ set(expected))
        raise ValueError(f"{Path(folder) / ADAPTER_WEIGHTS} does not fit this UNet: {len(diff)} mismatched "
                         f"tensors, e.g. {diff[0]!r}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(saved[name].to(p.dtype))
    return model


def load_finetuned(folder: str | Path, base_model: str | Path | None = None,
                   **pipeline_kwargs: Any) -> tuple[Any, UNetAugmentedScore]:
    """(pipeline, augmented model) from an adapter folder and the pipeline it refers to (or ``base_model``).

    A recorded relative ``base_model`` is read relative to the adapter folder; a Hub id must be downloaded first
    (everything here loads from local folders) and passed as ``base_model``.
    """
    meta = read_adapter_config(folder)
    base = base_model if base_model is not None else meta.get("base_model")
    if base is None:
        raise ValueError(f"{Path(folder) / ADAPTER_CONFIG} names no base_model; pass base_model=")
    if base_model is None:  # recorded: relative to the adapter folder (an absolute path from version 1 stays as is)
        base = Path(folder) / base
    pipe = load_pipeline(base, **pipeline_kwargs)
    return pipe, load_adapter(pipe, folder)


@contextmanager
def requested_labels(model: UNetAugmentedScore, labels: Tensor | Sequence[Sequence[int]]) -> Iterator[None]:
    """Within the block, every call of the model's UNet (e.g. by its pipeline) is conditioned on ``labels``.

    The label embedding is installed in the UNet (:meth:`UNetAugmentedScore.labels_installed`) and a forward
    pre-hook passes ``class_labels`` repeated to the UNet's batch: the pipeline's classifier-free guidance batch is
    [uncond; text], each of the pipeline's batch size, and the label conditions both halves as in
    :class:`SDLatentScore`. ``labels``: (n_images, K), one row per generated image, or (1, K) for all of them.
    All-null labels (-1) give the pre-trained model: the LoRA adapters are switched off for them.
    Outside the block the UNet has no label embedding (its LoRA adapters, if any, stay on).
    """
    unet = model.score.unet
    y = torch.as_tensor(labels, dtype=torch.long)
    check_labels(y, model.n_classes)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        n, rows = sample.shape[0], y.shape[0]
        if n % rows != 0:
            raise ValueError(f"{rows} label rows do not divide the UNet batch of {n}; give one row per image")
        kwargs["class_labels"] = y.to(sample.device).repeat(n // rows, 1)
        return args, kwargs

    null = bool((y == NULL_LABEL).all()) and model.lora_rank > 0
    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with lora_disabled(unet) if null else nullcontext(), model.labels_installed():
            yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------------------------
# A tiny random pipeline (tests, docs, the --tiny benchmark): every component built from a config, no weights


def _tiny_tokenizer(max_length: int) -> Any:
    """A CLIP BPE tokenizer over single letters, built offline (no merges: one token per letter)."""
    import inspect
    import tempfile

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4: files only
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length)


TINY_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 4,
}


def build_tiny_pipeline(seed: int = 0) -> Any:
    """A Stable Diffusion pipeline with SD's schedule and tiny random components (latents 4x8x8, images 3x16x16).

    Not a model of anything: it exercises every code path of this module on a CPU in seconds.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    tokenizer = _tiny_tokenizer(max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
