"""The random weights of an untrained label pathway, drawn again from a run's seed.

CTRL's pathway starts with its output exactly zero (Zhao et al. 2024, Sec. 4.2: zero-initialised label parameters, so
step 0 samples the pre-trained model): an output layer, a LoRA B matrix or an embedding table is zero, and the
weights that feed it are random. Those random weights do not change what the model computes at step 0, but they set
the first updates' gradients and so the whole run. A model built without seeding the global generator would make two
identical ``finetune(..., seed=s)`` calls differ; :func:`reseed_untrained_pathway` draws those weights again from
``s`` so that a run is a function of its arguments.

The draws replay a construction: under ``torch.manual_seed(seed)``, every layer that owns trainable weights calls its
``reset_parameters`` in registration order, then every peft LoRA adapter repeats what peft did when it was injected
(``lora_A`` and ``lora_B`` built as layers, then ``lora_A`` drawn again by peft's Kaiming init); tensors that were
all zero are zeroed again. A pathway built right after ``torch.manual_seed(seed)`` (as the suites and the command
line build theirs) therefore gets back the very weights it had, and its recorded results do not move. The model
must be untrained: if its control is not zero on a probe batch before, or would not be after, nothing changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ctrl_bio.reward import LabelPrior

#: The peft adapter name CTRL's LoRA layers carry (:func:`ctrl_bio.lora.inject_lora`).
ADAPTER = "ctrl"
#: Noise levels of the probe batch on which the control must be zero.
PROBE_TIMES = (0.1, 0.4, 0.7, 0.95)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no adapters
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def _redraw(model: nn.Module, seed: int) -> None:
    """Replay the pathway's construction draws under ``torch.manual_seed(seed)`` (the module docstring)."""
    lora = _lora_layers(model)
    inside_lora = {id(sub) for layer in lora for sub in (*layer.lora_A.modules(), *layer.lora_B.modules())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if id(module) in inside_lora or not hasattr(module, "reset_parameters"):
                continue
            own = list(module.parameters(recurse=False))
            if any(p.requires_grad for p in own):
                frozen = [(p, p.detach().clone()) for p in own if not p.requires_grad]
                module.reset_parameters()
                for p, value in frozen:  # a frozen weight beside a trainable one is the pre-trained model's
                    p.detach().copy_(value)
        for layer in lora:  # injected after the pathway's own layers (LoRAAugmentedScore, the UNet pathway)
            layer.lora_A[ADAPTER].reset_parameters()
            layer.lora_B[ADAPTER].reset_parameters()
            layer.reset_lora_parameters(ADAPTER, True)


def reseed_untrained_pathway(model: nn.Module, seed: int, x_shape: tuple[int, ...], label_prior: LabelPrior) -> bool:
    """Draw the random weights of ``model``'s untrained label pathway again from ``seed``.

    Args:
        model: an augmented model whose trainable parameters are its label pathway.
        seed: the run's seed.
        x_shape, label_prior: the shape of one sample and p(y), for the probe batch on which the control must be zero
            (standard-normal x at :data:`PROBE_TIMES`, drawn from generators of their own: the run's draws are
            untouched).

    Returns:
        Whether the weights were drawn again: False for a trained pathway (non-zero control), and, with a warning,
        for one whose control the re-draw would make non-zero (its zero-initialised part is not a whole tensor).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return False
    control = _probe_control(model, x_shape, label_prior)
    if bool(control().abs().amax() > 0):
        return False
    saved = [p.detach().clone() for p in params]
    device = params[0].device
    with torch.no_grad():
        # Drawn on the CPU whatever the device: CUDA's generator gives other numbers for the same seed.
        _redraw(model.cpu(), seed)
        model.to(device)
        for p, old in zip(params, saved):
            if not bool(old.any()):
                p.zero_()
        if bool(control().abs().amax() > 0):
            for p, old in zip(params, saved):
                p.copy_(old)
            warnings.warn(f"{type(model).__name__}: its random weights were not drawn again from the seed (the "
                          "re-draw changed the zero control); build it under torch.manual_seed(seed)", stacklevel=3)
            return False
    return True


def _probe_control(model: nn.Module, x_shape: tuple[int, ...], label_prior: LabelPrior) -> Callable[[], Tensor]:
    """u(x, t, y) of ``model`` on a fixed probe batch (:func:`reseed_untrained_pathway`)."""
    device = next(model.parameters()).device
    n = len(PROBE_TIMES)
    x = torch.randn(n, *x_shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.tensor(PROBE_TIMES, device=device)
    y = label_prior.sample(n, torch.Generator().manual_seed(0)).to(device)

    def control() -> Tensor:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a network's own draws must not move the run's
            return model.conditioned(y)(x, t)[1]

    return control
