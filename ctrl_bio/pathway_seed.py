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
line build theirs) therefore gets back the very weights it had, and its recorded results do not move.

Only an untrained pathway is touched (its control is zero on a probe batch), and each layer's new draw is kept only
if the control stays zero: a layer whose weights are not random (a trained copy of the pre-trained network, which
equals it) or whose zero is not a whole tensor gets its weights back, and the draws go on in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ctrl_bio.lora import ADAPTER_NAME
from ctrl_bio.reward import LabelPrior

#: Noise levels of the probe batch on which the control must be zero.
PROBE_TIMES = (0.1, 0.4, 0.7, 0.95)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no adapters
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A]


def _units(model: nn.Module) -> list[tuple[nn.Module, Callable[[], None]]]:
    """The draws of a construction, in order: each layer that owns trainable weights, then each LoRA adapter."""
    lora = _lora_layers(model)
    inside_lora = {id(sub) for layer in lora for sub in (*layer.lora_A.modules(), *layer.lora_B.modules())}
    units = [(m, m.reset_parameters) for m in model.modules()
             if id(m) not in inside_lora and hasattr(m, "reset_parameters")
             and any(p.requires_grad for p in m.parameters(recurse=False))]

    def lora_draw(layer: nn.Module) -> Callable[[], None]:
        def draw() -> None:  # peft builds both as layers (two draws), then draws lora_A again and zeroes lora_B
            layer.lora_A[ADAPTER_NAME].reset_parameters()
            layer.lora_B[ADAPTER_NAME].reset_parameters()
            layer.reset_lora_parameters(ADAPTER_NAME, True)
        return draw

    return units + [(layer, lora_draw(layer)) for layer in lora]  # injected after the pathway's own layers


def reseed_untrained_pathway(model: nn.Module, seed: int, x_shape: tuple[int, ...], label_prior: LabelPrior) -> int:
    """Draw the random weights of ``model``'s untrained label pathway again from ``seed``.

    Args:
        model: an augmented model whose trainable parameters are its label pathway.
        seed: the run's seed.
        x_shape, label_prior: the shape of one sample and p(y), for the probe batch on which the control must be zero
            (standard-normal x at :data:`PROBE_TIMES`, drawn from generators of their own: the run's draws are
            untouched).

    Returns:
        How many layers got new weights: 0 for a trained pathway (non-zero control).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0
    device = params[0].device
    # On the CPU whatever the device: CUDA's generator gives other numbers for the same seed.
    model.cpu()
    control = _probe_control(model, x_shape, label_prior)
    redrawn = 0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        if not bool(control().abs().amax() > 0):
            torch.manual_seed(seed)
            for module, draw in _units(model):
                own = list(module.parameters())
                saved = [p.detach().clone() for p in own]
                draw()
                for p, old in zip(own, saved):
                    if not p.requires_grad or not bool(old.any()):  # frozen weights, zero-initialised tensors
                        p.copy_(old)
                if bool(control().abs().amax() > 0):  # not a random layer feeding a zero one: keep what it had
                    for p, old in zip(own, saved):
                        p.copy_(old)
                elif any(not torch.equal(p, old) for p, old in zip(own, saved)):
                    redrawn += 1
    model.to(device)
    return redrawn


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
