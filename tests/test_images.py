"""Image domain (CPU suite): patches, exact JPEG and brightness labels, the augmented UNet, the suite end to end."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from ctrl_bio.model import NULL_LABEL  # noqa: E402
from ctrl_bio.objective import pathwise_loss  # noqa: E402
from ctrl_bio.sampling import euler_maruyama, time_grid  # noqa: E402
from domains.images.data import brightness, from_uint8, jpeg_bytes, load_patches, to_uint8  # noqa: E402
from domains.images.domain import CONV_LORA_TARGETS, ImageDomain  # noqa: E402
from domains.images.labels import brightness_log_prob, compress_log_prob, pair_pool  # noqa: E402
from domains.images.unet import LORA_TARGETS, UNetAugmentedScore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EDGES = [343, 361, 386]  # configs/label/compress.yaml
TINY_UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
             "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4}


@pytest.fixture(scope="module")
def tiny_domain():
    return ImageDomain(unet=dict(TINY_UNET))


@pytest.fixture(scope="module")
def tiny_net(tiny_domain):
    torch.manual_seed(0)
    return tiny_domain.score_network().eval()


def test_patches_split_and_pixel_round_trip():
    train, test = load_patches("training"), load_patches("test")
    assert train.x.shape[1:] == (1, 16, 16) and len(test) > 1000 and len(train) > 10 * len(test) // 2
    assert not set(train.names) & set(test.names)
    assert train.x.min() >= -1 and train.x.max() <= 1
    u8 = to_uint8(test.x[:64])
    assert np.array_equal(to_uint8(from_uint8(u8)), u8)  # grey levels survive the [-1, 1] encoding exactly


def test_pairs_of_the_two_labels_are_disjoint():
    a, b = pair_pool(0), pair_pool(1)
    assert len(a) + len(b) == len(load_patches("training"))
    rows_a = {bytes(r) for r in to_uint8(a).reshape(len(a), -1)}
    shared = sum(bytes(r) in rows_a for r in to_uint8(b).reshape(len(b), -1))
    assert shared <= 0.05 * len(b)  # only pixel-identical flat patches (black sky) may coincide


def test_jpeg_label_of_known_images():
    flat = np.full((1, 16, 16), 128, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 16, 16), dtype=np.uint8)
    stripes = np.tile(np.array([0, 255], dtype=np.uint8), (16, 8))[None]
    sizes = jpeg_bytes(np.concatenate([flat, stripes, noise]))
    assert sizes[0] < sizes[1] < sizes[2]
    assert np.array_equal(jpeg_bytes(flat), jpeg_bytes(flat.copy()))  # the encoder is deterministic
    classes = compress_log_prob(None, EDGES)(from_uint8(np.concatenate([flat, noise]))).argmax(1)
    assert classes.tolist() == [0, 3]  # flat: most compressible quartile; noise: least


def test_brightness_label_of_known_images():
    dark, light = np.zeros((1, 16, 16), dtype=np.uint8), np.full((1, 16, 16), 255, dtype=np.uint8)
    x = from_uint8(np.concatenate([dark, light]))
    assert brightness(to_uint8(x)).tolist() == [0.0, 1.0]
    assert brightness_log_prob(None, [0.44])(x).argmax(1).tolist() == [0, 1]


def test_compress_bins_are_the_training_quartiles():
    sizes = jpeg_bytes(to_uint8(load_patches("training").x))
    share = np.bincount(np.digitize(sizes, EDGES), minlength=4) / len(sizes)
    assert np.allclose(share, 0.25, atol=0.02)


@pytest.mark.parametrize("lora_rank,targets", [(0, LORA_TARGETS), (2, LORA_TARGETS), (2, CONV_LORA_TARGETS)])
def test_zero_initialised_pathway_reproduces_the_pretrained_sampler(tiny_domain, tiny_net, lora_rank, targets):
    net = copy.deepcopy(tiny_net)
    model = UNetAugmentedScore(net, (4, 2), lora_rank=lora_rank, lora_targets=targets)
    g = torch.Generator().manual_seed(0)
    times = time_grid(6, 1e-3, spacing="quadratic")
    noise, x_init = torch.randn(6, 5, 1, 16, 16, generator=g), torch.randn(5, 1, 16, 16, generator=g)
    y = torch.tensor([[0, 1], [3, 0], [2, 1], [NULL_LABEL, NULL_LABEL], [1, NULL_LABEL]])
    with torch.no_grad():
        ours = euler_maruyama(tiny_domain.sde, model.conditioned(y), x_init, times, noise=noise)
        pre = euler_maruyama(tiny_domain.sde, tiny_net, x_init, times, noise=noise)
    assert torch.equal(ours.x, pre.x)
    assert float(ours.kl.abs().max()) == 0.0
    assert net.unet.class_embedding is None  # the frozen UNet is left as it was


@pytest.mark.parametrize("lora_rank,targets", [(0, LORA_TARGETS), (2, CONV_LORA_TARGETS)])
def test_ctrl_step_trains_only_the_label_pathway_and_null_stays_pretrained(tiny_domain, tiny_net, lora_rank, targets):
    net = copy.deepcopy(tiny_net)
    model = UNetAugmentedScore(net, (4,), lora_rank=lora_rank, lora_targets=targets)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("embedding.") or "lora_" in n for n in trainable)
    target = torch.full((1, 16, 16), 0.5)

    def reward(x, y):  # a differentiable stand-in: patches near grey level 0.5 are liked
        return -((x - target) ** 2).flatten(1).mean(1)

    opt = torch.optim.Adam(trainable.values(), lr=1e-2)
    y = torch.tensor([[0], [1], [2], [3]])
    for _ in range(2):
        loss = pathwise_loss(model, tiny_domain.sde, reward, y, (1, 16, 16), n_steps=4, memory="checkpoint",
                             generator=torch.Generator().manual_seed(1)).loss
        opt.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    x, t = torch.randn(3, 1, 16, 16), torch.full((3,), 0.4)
    with torch.no_grad():
        s, u = model.score_and_control(x, t, torch.tensor([[NULL_LABEL], [NULL_LABEL], [NULL_LABEL]]))
        s_label, u_label = model.score_and_control(x, t, torch.tensor([[0], [1], [2]]))
    # Up to the rounding of a convolution over a doubled batch (lora_rank 0 computes both halves in one call).
    torch.testing.assert_close(s, tiny_net(x, t))
    assert float(u.abs().max()) == 0.0
    assert float(u_label.abs().max()) > 0.0


@pytest.mark.slow
def test_suite_end_to_end_two_labels(tiny_domain, tiny_net, tmp_path):
    """`ctrl-bio benchmark suite=images label=[compress,brightness]` with a tiny UNet: every row, results, plots."""
    from ctrl_bio.training.runs import export_network

    ckpt = export_network(tiny_net, tmp_path / "score.safetensors")
    run_dir = tmp_path / "run"
    overrides = [
        "suite=images", "label=[compress,brightness]", f"domain.checkpoint={ckpt}", "data.n_pairs=64",
        *[f"domain.unet.{k}={json.dumps(v).replace(' ', '')}" for k, v in TINY_UNET.items()],
        "label.compress.training.epochs=1", "label.brightness.training.epochs=1",
        "suite.n_eval=16", "suite.n_select=8", "suite.n_steps=3", "suite.batch_size=16", "method.pool_size=32",
        "method.sm_steps=2", "method.sm_batch_size=8", "method.eval_every=2",
        "method.eval_batch_size=4", "method.steps=1", "method.batch_size=2",
        "method.grad_last_k=1", "suite.alpha0.steps=1", "suite.alpha0.batch_size=2", "suite.alpha0.grad_last_k=1",
        "suite.baselines.cfg.steps=2", "suite.baselines.classifier_guidance.steps=2",
        "suite.baselines.classifier_guidance.hidden=8", "suite.baselines.best_of_n.n=2",
        "suite.baselines.optimum.n=32", "progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run([sys.executable, "-m", "ctrl_bio.cli", "benchmark", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run_dir / "results.json").read_text())
    rows = {r["method"]: r["metrics"] for r in result["rows"]}
    assert list(rows) == ["pretrained", "optimum", "ctrl", "ctrl_alpha0", "cfg", "classifier_guidance", "dps",
                          "best_of_n", "real_data"]
    assert result["info"]["optimum"]["pool_size"] == 32  # suite.baselines.optimum.n reached the row
    assert all("fraction_of_optimum" in rows[m] for m in ("ctrl", "ctrl_alpha0", "cfg", "dps", "best_of_n"))
    assert "fraction_of_optimum" not in rows["real_data"] and (run_dir / "fraction_of_optimum.png").is_file()
    for m in rows.values():
        for key in ("accuracy", "accuracy_compress", "accuracy_brightness", "macro_f1", "fd_pooled", "diversity",
                    "jpeg_bytes"):
            assert np.isfinite(m[key]), key
    # Exact labels: real held-out patches drawn for each request meet it; pre-trained samples ignore requests.
    assert rows["real_data"]["accuracy"] == 1.0
    assert rows["pretrained"]["kl"] == 0.0
    for plot in ("confusion_compress.png", "confusion_brightness.png", "jpeg_sizes.png", "training.png",
                 "samples/ctrl.png"):
        assert (run_dir / plot).stat().st_size > 0
    saved = np.load(run_dir / "samples" / "ctrl.npz")
    assert saved["images"].shape == (16, 16, 16) and saved["images"].dtype == np.uint8
    assert saved["requested"].shape == (16, 2)
