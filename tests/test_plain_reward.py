"""A plain reward (no label): finetune(label_prior=None) tilts the pre-trained law by r, and the quick start's
example of it runs."""

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def test_the_quickstart_plain_reward_example_moves_mass_where_r_is_large(capsys):
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[1]
    exec(compile(block, "<docs/quickstart.md>", "exec"), {"__name__": "__quickstart__"})
    out = capsys.readouterr().out
    before, after = (float(v) for v in re.findall(r"(\d\.\d\d)", out)[:2])
    assert before < 0.3 and after > before + 0.2, out


def test_plain_reward_gives_both_signatures_and_one_class_requests():
    from ctrl_bio.plain_reward import PLAIN_LABELS, PlainReward, plain_prior, plain_requests

    reward = PlainReward(lambda x0: -x0.pow(2).sum(1))
    x0 = torch.randn(5, 3)
    assert torch.equal(reward(x0, plain_requests(5)), -x0.pow(2).sum(1))
    assert reward.log_prob_fns[0](x0).shape == (5, 1)
    assert plain_prior().n_classes == PLAIN_LABELS
    assert plain_requests(3).tolist() == [[0], [0], [0]]
