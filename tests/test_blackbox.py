"""Black-box rewards: values come back in order, every failure is NaN and counted, nothing is fatal."""

import math
import sys

import numpy as np
import pytest
import torch

from ctrl_bio.blackbox import CallableReward, CommandReward, label_likelihood_black_box, parse_values

PY = sys.executable
SUM_ROWS = "import sys, numpy as np; x = np.load(sys.argv[1]); print('\\n'.join(str(v) for v in x.sum(1)))"


def test_callable_reward_counts_none_nan_and_exceptions():
    calls = {"n": 0}

    def fn(x, y):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("scorer crashed")
        return [None, float("nan"), float("inf"), 2.5]

    reward = CallableReward(fn)
    x, y = torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long)
    first = reward(x, y)
    assert torch.isnan(first[:3]).all() and first[3] == 2.5
    assert reward.failures == 3
    assert torch.isnan(reward(x, y)).all()  # the exception is counted, not raised
    assert (reward.failures, reward.queries) == (7, 8)


def test_callable_reward_of_wrong_length_is_all_nan():
    reward = CallableReward(lambda x, y: np.ones(3))
    assert torch.isnan(reward(torch.zeros(4, 2), torch.zeros(4, 1, dtype=torch.long))).all()
    assert reward.failures == 4


@pytest.mark.parametrize("file_format", ["npy", "csv"])
def test_command_reward_reads_values_from_stdout(file_format):
    script = SUM_ROWS if file_format == "npy" else SUM_ROWS.replace("np.load(sys.argv[1])",
                                                                     "np.loadtxt(sys.argv[1], delimiter=',', ndmin=2)")
    reward = CommandReward([PY, "-c", script], timeout_s=30, file_format=file_format)
    x = torch.arange(12.0).reshape(4, 3)
    torch.testing.assert_close(reward(x, torch.zeros(4, 1, dtype=torch.long)), x.sum(1))
    assert reward.failures == 0 and reward.queries == 4


def test_command_reward_with_output_file_and_labels():
    script = ("import sys, numpy as np; x = np.load(sys.argv[1]); y = np.load(sys.argv[2]);"
              "open(sys.argv[3], 'w').write('\\n'.join(str(v) for v in x[:, 0] * (y[:, 0] + 1)))")
    reward = CommandReward([PY, "-c", script, "{input}", "{labels}", "{output}"], timeout_s=30)
    x = torch.ones(3, 2)
    y = torch.tensor([[0], [1], [2]])
    torch.testing.assert_close(reward(x, y), torch.tensor([1.0, 2.0, 3.0]))


def test_failing_command_is_counted_not_fatal():
    reward = CommandReward([PY, "-c", "import sys; sys.exit('no licence for the docking program')"], timeout_s=30)
    values = reward(torch.zeros(5, 2), torch.zeros(5, 1, dtype=torch.long))
    assert torch.isnan(values).all() and reward.failures == 5
    assert "exit status 1" in reward.last_error and "licence" in reward.last_error


def test_timeout_is_counted_not_fatal():
    reward = CommandReward([PY, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    values = reward(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.long))
    assert torch.isnan(values).all() and reward.failures == 3
    assert "timed out" in reward.last_error


def test_missing_and_unparseable_lines_are_nan():
    values = parse_values("1.5\nerror\n\n-2\n", 4)
    assert values[0] == 1.5 and math.isnan(values[1]) and values[2] == -2 and math.isnan(values[3])
    reward = CommandReward([PY, "-c", "print('0.5'); print('oops')"], timeout_s=30)
    out = reward(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.long))
    assert out[0] == 0.5 and torch.isnan(out[1:]).all() and reward.failures == 2


def test_label_likelihood_black_box_gives_values_without_gradient():
    w = torch.randn(2, 3, requires_grad=True)
    reward = label_likelihood_black_box(lambda x: torch.log_softmax(x @ w, dim=1))
    x = torch.randn(6, 2, requires_grad=True)
    y = torch.tensor([[0], [1], [2], [0], [1], [2]])
    r = reward(x, y)
    assert not r.requires_grad
    torch.testing.assert_close(r, torch.log_softmax(x @ w, 1).gather(1, y).squeeze(1).detach())
