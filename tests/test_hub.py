"""ctrl_bio.hub: save_pretrained / from_pretrained folders (config.json, model.safetensors, README.md), offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ctrl_bio.finetune import finetune
from ctrl_bio.hub import from_pretrained, read_config, save_pretrained
from ctrl_bio.interop import wrap_network
from ctrl_bio.model import AugmentedScore, VectorPathway
from ctrl_bio.nets import VectorScoreNet
from ctrl_bio.reward import CalibratedClassifier, LabelPrior, LogLikelihoodReward, mlp_classifier
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.sde import DiscreteScheduleSDE

ROOT = Path(__file__).resolve().parents[1]


def sample(model, seed: int = 7, n: int = 64):
    """The same request, prior draw and Brownian noise for a given seed."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n).remainder(2)[:, None]
    x1 = model.sde.prior_sampling((n, 2), generator=g)
    with torch.no_grad():
        return euler_maruyama(model.sde, model.conditioned(y), x1, time_grid(30), generator=g).x


@pytest.fixture(scope="module")
def finetuned_gmm():
    """A tiny fine-tuned gmm model: a learned pre-trained network (briefly fitted to the mixture), a trained pathway."""
    from domains.gmm import make_testbed

    torch.manual_seed(0)
    tb = make_testbed(dim=2, n_components=4, n_classes=2, seed=3)
    net = VectorScoreNet(tb.sde, dim=2, hidden=32, depth=2)
    data, _ = tb.mixture.sample(2048)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(100):
        x0 = data[torch.randint(0, len(data), (256,))]
        t, eps = torch.rand(256) * 0.999 + 1e-3, torch.randn(256, 2)
        loss = ((net.predict_eps(tb.sde.perturb(x0, t, eps), t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = AugmentedScore(net, VectorPathway(2, (2,), hidden=16, depth=2), tb.sde)
    reward = LogLikelihoodReward([tb.component_label.log_prob])
    prior = LabelPrior([torch.full((2,), 0.5)])
    finetune(model, tb.sde, reward, prior, (2,), sm_steps=60, sm_batch_size=128, pool_size=1000, n_steps=30,
             eval_every=60, eval_batch_size=64, progress=False)
    assert any(p.abs().sum() > 0 for p in model.pathway.out.parameters())  # trained away from zero
    return model.eval()


def test_finetuned_gmm_model_round_trips_bit_for_bit_in_a_fresh_process(finetuned_gmm, tmp_path):
    folder = save_pretrained(finetuned_gmm, tmp_path / "ctrl_gmm", labels=[{"name": "component", "n_classes": 2}],
                             alpha=1.0, gamma=1.0, estimator="score_matching", training_data="2,048 mixture samples",
                             metrics={"accuracy": 0.99})
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md", "base"}
    config = json.loads((folder / "config.json").read_text())
    assert config["ctrl_bio"]["kind"] == "ctrl_model" and config["base_model"] == "base"
    assert str(tmp_path) not in (folder / "config.json").read_text()  # no absolute path anywhere
    card = (folder / "README.md").read_text()
    facts = ("library_name: ctrl-bio", "`base`", "`component` (2 classes)", "score_matching", "| accuracy | 0.99 |")
    assert all(fact in card for fact in facts)

    expected = sample(finetuned_gmm)
    torch.save(expected, tmp_path / "expected.pt")
    # The folder moves: copied elsewhere, it still finds its base by the relative reference.
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    folder.rename(moved)
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from ctrl_bio.hub import from_pretrained
        from test_hub import sample
        model = from_pretrained({str(moved)!r})
        torch.save(sample(model), {str(tmp_path / 'loaded.pt')!r})
    """)
    # HF_HUB_OFFLINE: any download attempt would raise; a local folder needs none.
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert torch.equal(torch.load(tmp_path / "loaded.pt", weights_only=True), expected)


def test_base_model_by_relative_path_or_hub_id(finetuned_gmm, tmp_path):
    base = save_pretrained(finetuned_gmm.pretrained, tmp_path / "models" / "pretrained")
    assert json.loads((base / "config.json").read_text())["ctrl_bio"]["kind"] == "score_network"
    folder = save_pretrained(finetuned_gmm, tmp_path / "runs" / "ctrl", base_model=base,
                             extra={"x_shape": [2], "n_steps": 30})
    assert read_config(folder)["base_model"] == "../../models/pretrained"
    assert read_config(folder)["extra"] == {"x_shape": [2], "n_steps": 30}
    assert not (folder / "base").exists()
    loaded = from_pretrained(folder)
    assert torch.equal(sample(loaded), sample(finetuned_gmm))
    # A Hub id is recorded as it is (and put in the card's metadata), nothing is downloaded by saving.
    hub = save_pretrained(finetuned_gmm, tmp_path / "hub", base_model="someone/gmm-pretrained")
    assert json.loads((hub / "config.json").read_text())["base_model"] == "someone/gmm-pretrained"
    assert "base_model: someone/gmm-pretrained" in (hub / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="neither"):
        save_pretrained(finetuned_gmm, tmp_path / "bad", base_model=tmp_path / "missing" / "folder")


def test_score_network_and_reward_classifier_round_trip(tmp_path):
    sde = DiscreteScheduleSDE(torch.linspace(0.999, 0.01, 50))  # a schedule kept by its alphas_cumprod
    net = VectorScoreNet(sde, dim=3, hidden=16, depth=1)
    loaded = from_pretrained(save_pretrained(net, tmp_path / "net"))
    x, t = torch.randn(5, 3), torch.rand(5)
    assert torch.equal(loaded(x, t), net(x, t))
    assert torch.equal(loaded.sde.alphas_cumprod, sde.alphas_cumprod)

    # A network brought in by wrap_network (here one that predicts x0) keeps its prediction type and time input.
    wrapped = wrap_network(VectorScoreNet(sde, dim=3, hidden=16, depth=1), predicts="x0", sde=sde, time="timestep")
    loaded_wrapped = from_pretrained(save_pretrained(wrapped, tmp_path / "wrapped"))
    assert (loaded_wrapped.predicts, loaded_wrapped.time) == ("x0", "timestep")
    assert torch.equal(loaded_wrapped(x, t), wrapped(x, t))

    clf = CalibratedClassifier(mlp_classifier(3, 4, hidden=8), temperature=1.7)
    folder = save_pretrained(clf, tmp_path / "clf", labels=[{"name": "bin", "n_classes": 4}],
                             metrics={"ece_after": 0.01})
    loaded_clf = from_pretrained(folder)
    assert isinstance(loaded_clf, CalibratedClassifier) and float(loaded_clf.temperature) == pytest.approx(1.7)
    assert torch.equal(loaded_clf(x), clf(x))


def test_classifier_by_builder_and_nested_sequential(tmp_path):
    from ctrl_bio.labels import LabelError
    from ctrl_bio.reward import flat_mlp_classifier

    x = torch.randn(4, 2, 3)
    clf = CalibratedClassifier(flat_mlp_classifier((2, 3), 3, hidden=8), temperature=0.8)
    read_back = from_pretrained(save_pretrained(clf, tmp_path / "auto"))  # Flatten + mlp_classifier, from its layers
    assert torch.equal(read_back(x), clf(x))
    builder = {"_target_": "ctrl_bio.reward.flat_mlp_classifier", "x_shape": [2, 3], "n_classes": 3, "hidden": 8}
    folder = save_pretrained(clf, tmp_path / "built", network=builder)
    config = json.loads((folder / "config.json").read_text())
    assert config["network"] == {"target": "ctrl_bio.reward.flat_mlp_classifier",
                                 "kwargs": {"x_shape": [2, 3], "n_classes": 3, "hidden": 8}}
    assert torch.equal(from_pretrained(folder)(x), clf(x))
    # A config.json that names a callable outside the trusted packages is refused, not imported.
    config["network"]["target"] = "os.system"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LabelError, match="trusted"):
        from_pretrained(folder)


def test_unknown_folders_and_ids_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hub id"):
        from_pretrained(tmp_path / "nothing" / "here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path / "empty")
    with pytest.raises(TypeError, match="cannot save a Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")
    no_config = torch.nn.Linear(2, 2)
    no_config.sde = DiscreteScheduleSDE(torch.linspace(0.99, 0.1, 10))
    with pytest.raises(TypeError, match="`config` dict of its constructor arguments"):
        save_pretrained(no_config, tmp_path / "linear")


def test_lora_ctrl_model_round_trips_with_its_adapters_in_peft_format(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig

    from ctrl_bio.lora import LoRAAugmentedScore
    from ctrl_bio.nets import ConvScoreNet
    from ctrl_bio.sde import VPSDE

    torch.manual_seed(0)
    sde = VPSDE()
    net = ConvScoreNet(sde, channels_in=4, hidden=16, n_blocks=2, emb_dim=16, n_fourier=8)
    model = LoRAAugmentedScore(net, (3,), lora_rank=2, lora_targets=("conv1", "conv2"))
    with torch.no_grad():  # as after fine-tuning: adapters and label rows away from zero (the null row stays zero)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn_like(p))
        model.embedding.tables[0].weight[-1].zero_()
    folder = save_pretrained(model, tmp_path / "lora", labels=[{"name": "celltype", "n_classes": 3}])
    assert {"adapter_config.json", "adapter_model.safetensors", "base"} <= {p.name for p in folder.iterdir()}
    peft_config = LoraConfig.from_pretrained(str(folder))
    assert peft_config.r == 2 and peft_config.base_model_name_or_path == "base"
    loaded = from_pretrained(folder)
    assert isinstance(loaded, LoRAAugmentedScore)
    x, t, y = torch.randn(3, 4, 12), torch.tensor([0.9, 0.4, 0.1]), torch.tensor([[0], [2], [-1]])
    with torch.no_grad():
        s, u = model.score_and_control(x, t, y)
        s_loaded, u_loaded = loaded.score_and_control(x, t, y)
        assert torch.equal(s_loaded, s) and torch.equal(u_loaded, u)
        assert u.abs().sum() > 0  # the adapters and the embedding act
        # The base folder holds the pre-trained network itself, without adapters.
        torch.testing.assert_close(from_pretrained(folder / "base")(x, t), net(x, t), rtol=0, atol=0)


def test_the_molecule_pathway_round_trips_with_its_peft_adapters(tmp_path):
    """A LoRAAugmentedScore subclass (the graph pathway: label embedding + LoRA on the node and edge MLPs) is saved
    with its own class and loads to the same scores, bit for bit."""
    from domains.molecules.domain import MoleculeDomain

    domain = MoleculeDomain(data="slice")
    torch.manual_seed(0)
    model = domain.augment(domain.pretrained_model(), [3])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # as if trained: the LoRA B matrices leave zero
    save_pretrained(model, tmp_path / "mol")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "mol").iterdir()}
    loaded = from_pretrained(tmp_path / "mol")
    assert type(loaded) is type(model)
    x, t, y = torch.randn(4, *domain.x_shape), torch.full((4,), 0.3), torch.tensor([[0], [1], [2], [1]])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_the_image_unet_pathway_round_trips_with_its_peft_adapters(tmp_path, lora_rank):
    """The UNet pathway (label embedding in the time embedding + LoRA in the UNet, an AdapterModel of a domain) saves
    with its peft adapters and its base UNet, and loads to the same scores, bit for bit."""
    pytest.importorskip("diffusers")
    from peft import LoraConfig

    from domains.images.domain import ImageDomain
    from domains.images.unet import UNetAugmentedScore

    tiny = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
            "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4}
    domain = ImageDomain(unet=tiny, lora_rank=lora_rank)
    torch.manual_seed(0)
    pretrained = domain.score_network().eval()
    model = domain.augment(pretrained, [2, 3])
    with torch.no_grad():  # as after fine-tuning: adapters and label rows away from zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    folder = save_pretrained(model, tmp_path / "unet", labels=[{"name": "compress", "n_classes": 2}])
    names = {p.name for p in folder.iterdir()}
    assert ("adapter_model.safetensors" in names) == (lora_rank > 0)
    if lora_rank:
        assert LoraConfig.from_pretrained(str(folder)).r == lora_rank
    loaded = from_pretrained(folder)
    assert type(loaded) is UNetAugmentedScore and loaded.lora_rank == lora_rank
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.9, 0.4, 0.1]), torch.tensor([[0, 2], [1, -1], [-1, -1]])
    with torch.no_grad():
        s, u = model.score_and_control(x, t, y)
        s_loaded, u_loaded = loaded.score_and_control(x, t, y)
        assert torch.equal(s_loaded, s) and torch.equal(u_loaded, u)
        assert u[:2].abs().sum() > 0 and u[2].abs().sum() == 0  # the pathway acts; a null request is pre-trained
        # base/ holds the pre-trained UNet without adapters.
        torch.testing.assert_close(from_pretrained(folder / "base")(x, t), pretrained(x, t), rtol=0, atol=0)


def test_an_adapter_model_the_folder_cannot_rebuild_is_refused_in_one_line(tmp_path):
    """A trained copy (no adapters) or a real-valued label embedding has no rebuild in config.json: refused."""
    pytest.importorskip("peft")
    from ctrl_bio.lora import LoRAAugmentedScore
    from ctrl_bio.nets import ConvScoreNet
    from ctrl_bio.sde import VPSDE

    net = ConvScoreNet(VPSDE(), channels_in=4, hidden=8, n_blocks=1, emb_dim=8, n_fourier=4)
    copy = LoRAAugmentedScore(net, (2,), lora_rank=0, lora_targets=(), train_copy=True)
    with pytest.raises(TypeError, match="cannot save this LoRAAugmentedScore.*no trained copy"):
        save_pretrained(copy, tmp_path / "copy")
