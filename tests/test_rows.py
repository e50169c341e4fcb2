"""The suites' shared row code: which unlabelled pool ``ctrl``'s score matching tilts."""

from types import SimpleNamespace

import pytest
import torch

from ctrl_bio.rows import ctrl_pool


def _context(project=None):
    """A suite context with what ``ctrl_pool`` reads: continuous "samples" of the pre-trained model and a
    training set on the {-1, +1} lattice."""
    domain = SimpleNamespace(project=project) if project is not None else SimpleNamespace()

    def sample(score_fn_for, y, seed_offset=2000):
        g = torch.Generator().manual_seed(seed_offset)
        return 0.7 * torch.randn(y.shape[0], 6, generator=g), torch.zeros(y.shape[0])

    return SimpleNamespace(domain=domain, seed=0, x_train=torch.randn(50, 6).sign(), n_classes=(3,),
                           pretrained=None, sample=sample)


def test_training_pool_is_a_fixed_subset_of_the_training_data():
    ctx = _context()
    pool = ctrl_pool(ctx, "training", 20)
    assert pool.shape == (20, 6)
    assert torch.equal(pool, ctrl_pool(ctx, "training", 20))  # the same subset on every call
    assert all(any(torch.equal(p, x) for x in ctx.x_train) for p in pool)


def test_pretrained_pool_is_snapped_by_the_domains_projection_where_it_has_one():
    raw = ctrl_pool(_context(), "pretrained", 16)
    assert set(raw.unique().tolist()) != {-1.0, 1.0}  # continuous end points without a projection
    snapped = ctrl_pool(_context(project=torch.sign), "pretrained", 16)
    assert torch.equal(snapped, raw.sign())


def test_unknown_pool_is_one_clear_error():
    with pytest.raises(ValueError, match="'training' or 'pretrained'"):
        ctrl_pool(_context(), "data", 4)
