"""The CPU image domain as a :class:`ctrl_bio.domain.Domain`: 16x16 grey patches of real photographs.

``ctrl-bio pretrain domain=images`` trains a pixel-space diffusers ``UNet2DModel`` (noise prediction on the DDPM
linear schedule, written as a :class:`ctrl_bio.sde.DiscreteVPSDE`) on the training patches and their mirror
images; the network ships as ``domains/images/checkpoints/pretrained.safetensors`` (+ ``.json``). The label pathway
is :class:`domains.images.unet.UNetAugmentedScore`: a zero-initialised label embedding added to the UNet's time
embedding, plus rank-4 LoRA adapters on its ResNet convolutions (``lora_rank: 0`` for the embedding alone). Samples
are written as PNG files.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctrl_bio.domain import ScoreModel
from ctrl_bio.model import NULL_LABEL
from ctrl_bio.sde import DiscreteVPSDE
from domains.images.data import PATCH, load_patches, to_uint8
from domains.images.unet import UNetAugmentedScore, UNetScore

#: LoRA targets of the CPU suite: the convolutions of every ResNet block.
CONV_LORA_TARGETS = ("conv1", "conv2")

#: The pre-trained network that ships with the package.
SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "pretrained.safetensors"

#: ``UNet2DModel`` of the shipped network: 1.1M parameters, attention at 4x4.
DEFAULT_UNET: dict[str, Any] = {
    "sample_size": PATCH, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [32, 64, 64], "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
}


@dataclass
class ImageDomain:
    """16x16 grey patches in [-1, 1] under the DDPM linear schedule (1000 steps, beta 1e-4 to 0.02).

    Attributes:
        unet: keyword arguments of ``diffusers.UNet2DModel`` for ``pretrain`` (default :data:`DEFAULT_UNET`).
        checkpoint: pre-trained weights (a ``.safetensors`` file or a ``pretrain`` run directory); None: the shipped
            network.
        lora_rank: rank of LoRA adapters beside the label embedding; 0: the embedding only.
        lora_targets: the UNet modules that get LoRA adapters (suffixes of module names; peft adapts Linear and
            Conv2d layers): by default every ResNet convolution (``conv1``, ``conv2``); the attention projections are
            :data:`domains.images.unet.LORA_TARGETS`. JPEG size is texture, which convolutions make: on the compress
            task, rank-4 convolution LoRA lifted ``ctrl``'s accuracy from 0.41 (embedding only) to 0.71
            (benchmarks/images/README.md).
        beta_start, beta_end, num_train_timesteps: the DDPM schedule.
    """

    unet: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_UNET))
    checkpoint: str | None = None
    lora_rank: int = 4
    lora_targets: list[str] = field(default_factory=lambda: list(CONV_LORA_TARGETS))
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    _train_x: Tensor | None = field(default=None, init=False, repr=False)

    name = "images"
    #: The sampler's time grid for this domain (``finetune`` and ``sample`` use it unless told otherwise): fine
    #: steps near the data, so that the last Euler-Maruyama step adds no visible noise.
    spacing = "quadratic"
    label_types = ("categorical", "bins")
    x_shape = (1, PATCH, PATCH)

    def __post_init__(self) -> None:
        self.sde = DiscreteVPSDE(self.beta_start, self.beta_end, self.num_train_timesteps, "linear")

    def training_data(self) -> Tensor:
        """Training patches and their mirror images (a horizontal flip keeps a photograph a photograph)."""
        if self._train_x is None:
            x = load_patches("training").x
            self._train_x = torch.cat([x, torch.flip(x, dims=[-1])])
        return self._train_x

    def score_network(self) -> nn.Module:
        return UNetScore(self.sde, **self.unet)

    def pretrained_model(self) -> ScoreModel:
        from ctrl_bio.training.runs import load_network

        path = Path(self.checkpoint) if self.checkpoint else SHIPPED_CHECKPOINT
        return load_network(path, self.sde)

    def augment(self, pretrained: ScoreModel, n_classes: Sequence[int]) -> UNetAugmentedScore:
        if self.lora_rank > 0:  # LoRA layers are injected into the network: give each augmented model its own copy
            pretrained = copy.deepcopy(pretrained)
        return UNetAugmentedScore(pretrained, n_classes, lora_rank=self.lora_rank, lora_targets=self.lora_targets)

    def write_samples(self, x: Tensor, y: Tensor, label_names: Sequence[str], run_dir: Path) -> Path:
        """One PNG per sample, named ``sample<i>_<label>=<class>...png``, in ``run_dir/samples``."""
        from PIL import Image

        out = Path(run_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        for i, (img, row) in enumerate(zip(to_uint8(x), y.tolist())):
            tags = "_".join(f"{n}={v}" for n, v in zip(label_names, row) if v != NULL_LABEL) or "unconditional"
            Image.fromarray(img, mode="L").save(out / f"sample{i}_{tags}.png")
        return out


def make_domain(**kwargs: Any) -> ImageDomain:
    """Hydra entry point (``configs/plugin/images.yaml``)."""
    return ImageDomain(**kwargs)
