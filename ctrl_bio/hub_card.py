"""The generated ``README.md`` model card of a :mod:`ctrl_bio.hub` folder: what it says beyond the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelCardInfo:
    """What the generated ``README.md`` says about a model beyond its config (all optional).

    Attributes:
        labels: the labels a CTRL model or classifier was trained for, e.g. ``[{"name": "gc", "n_classes": 3}]``.
        alpha: CTRL's KL weight; gamma: its reward weight.
        estimator: how the label pathway was fitted (``score_matching``, ``pathwise``, ...).
        training_data: where the pairs / samples came from (free text).
        metrics: measured numbers, e.g. ``{"accuracy": 0.97, "kl": 2.1}``.
        description: a paragraph of free text.
    """

    labels: list[dict[str, Any]] = field(default_factory=list)
    alpha: float | None = None
    gamma: float | None = None
    estimator: str | None = None
    training_data: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    description: str | None = None


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}
{% if description %}
{{ description }}
{% endif %}
| | |
|---|---|
| kind | `{{ kind }}` |
{% if base_model %}| base model | `{{ base_model }}` |
{% endif %}{% if labels %}| labels | {{ labels }} |
{% endif %}{% if alpha is not none %}| alpha (KL weight) | {{ alpha }} |
{% endif %}{% if gamma is not none %}| gamma (reward weight) | {{ gamma }} |
{% endif %}{% if estimator %}| estimator | `{{ estimator }}` |
{% endif %}{% if training_data %}| training data | {{ training_data }} |
{% endif %}| network | `{{ network }}` |
{% if sde %}| SDE | `{{ sde }}` |
{% endif %}
{% if metrics %}## Measured

| metric | value |
|---|---|
{% for name, value in metrics.items() %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}
## Use

```python
from ctrl_bio.hub import from_pretrained

model = from_pretrained("{{ load_name }}")
```

Written by ctrl-bio. CTRL: Zhao et al. 2024, "Adding Conditional Control to
Diffusion Models with Reinforcement Learning" ([arXiv:2406.12120](https://arxiv.org/abs/2406.12120)).
"""

SUMMARIES = {
    "score_network": "A pre-trained diffusion model's score network s(x, t) on the SDE below (data at t = 0, noise "
                     "at t = 1).",
    "reward_classifier": "A calibrated reward classifier p(y | x) on clean samples (temperature-scaled), the reward "
                         "log p(y | x) of CTRL fine-tuning.",
    "ctrl_model": "A CTRL fine-tuned diffusion model: the frozen base model plus a label pathway, sampling "
                  "p(x | y) proportional to p_base(x) p(y | x)^(gamma / alpha). Only the label pathway is stored "
                  "here; the base model is loaded from its reference.",
}
