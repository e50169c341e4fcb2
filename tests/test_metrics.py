"""ctrl_bio.metrics: classification scores (torchmetrics) against hand-computed values."""

import pytest
import torch

from ctrl_bio.metrics import expected_calibration_error, macro_f1
from ctrl_bio.reward import expected_calibration_error as reward_ece


def test_expected_calibration_error_by_hand():
    # Two bins hold one sample each: |0.9 - 1| / 2 + |0.6 - 0| / 2 = 0.35 (Guo et al. 2017, eq. 3).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.35, abs=1e-6)
    # A perfectly calibrated pair of bins: confidence 1 and always right.
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == pytest.approx(0.0, abs=1e-7)
    assert reward_ece is expected_calibration_error  # the public name in ctrl_bio.reward stays


def test_macro_f1_by_hand_skips_a_class_neither_predicted_nor_present():
    pred, target = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    # class 0: tp 1, fp 1, fn 0 -> F1 2/3; class 1: tp 2, fp 0, fn 1 -> F1 4/5; class 2 absent everywhere: skipped.
    assert macro_f1(pred, target, n_classes=3) == pytest.approx((2 / 3 + 4 / 5) / 2, abs=1e-6)
    # A class present but never predicted counts with F1 0.
    assert macro_f1(torch.tensor([0, 0]), torch.tensor([0, 1]), n_classes=2) == pytest.approx((2 / 3 + 0) / 2, abs=1e-6)
