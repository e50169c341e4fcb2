"""Stable Diffusion for CTRL (domains/images/stable_diffusion.py) on a tiny random pipeline built from configs."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from ctrl_bio.objective import pathwise_loss  # noqa: E402
from ctrl_bio.reward import CalibratedClassifier, fit_temperature  # noqa: E402
from ctrl_bio.sampling import euler_maruyama, time_grid  # noqa: E402
from domains.images.stable_diffusion import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AestheticClassifier,
    AestheticMLP,
    CompressibilityCNN,
    LatentDecoder,
    SDLatentScore,
    aesthetic_logits,
    build_tiny_pipeline,
    jpeg_kb,
    jpeg_kb_class,
    latent_reward,
    load_adapter,
    load_aesthetic_classifier,
    load_clip_vision,
    load_compressibility_classifier,
    load_finetuned,
    load_pipeline,
    load_reward_model,
    requested_labels,
    save_adapter,
    save_reward_model,
    sde_from_scheduler,
    to_uint8,
)
from domains.images.unet import UNetAugmentedScore  # noqa: E402

PROMPT = "a cat"


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    """A tiny pipeline saved as a diffusers folder; every test loads its own copy (UNets are augmented in place)."""
    path = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def pipe(sd_path):
    p = load_pipeline(sd_path)
    p.set_progress_bar_config(disable=True)
    return p


def _fill_pathway(model: UNetAugmentedScore, seed: int = 1) -> None:
    """Non-zero label embedding and LoRA weights, as after some fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for table in model.embedding.tables:  # the null row stays zero, as LabelEmbedding keeps it
            table.weight[-1].zero_()


def _pipeline_images(pipe, seed: int = 0, n: int = 1):
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, num_images_per_prompt=n,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


# (a) the schedule ---------------------------------------------------------------------------------------------------


def test_sde_marginals_equal_scheduler_alphas_cumprod(pipe):
    from diffusers import DDPMScheduler

    for scheduler in (pipe.scheduler, DDPMScheduler()):  # SD's scaled_linear and DDPM's linear
        sde = sde_from_scheduler(scheduler)
        n = scheduler.config.num_train_timesteps
        abar = scheduler.alphas_cumprod.double()
        torch.testing.assert_close(sde.alphas_cumprod, abar, rtol=1e-5, atol=0)
        t_grid = (torch.arange(n, dtype=torch.float64) + 1) / n  # step n sits at t = (n + 1) / N
        torch.testing.assert_close(sde.alpha(t_grid) ** 2, abar, rtol=1e-5, atol=0)
        assert torch.equal(sde.timestep(t_grid), torch.arange(n, dtype=torch.float64))


def test_any_schedule_and_prediction_type_is_accepted(pipe):
    """A squaredcos v-prediction scheduler (was refused): the SD score is the v output's, guidance combined on v."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0)
    assert score.prediction_type == "v"
    t_n = (torch.arange(1000, dtype=torch.float64) + 1) / 1000
    torch.testing.assert_close(score.sde.alpha(t_n) ** 2, pipe.scheduler.alphas_cumprod.double(), rtol=1e-5,
                               atol=1e-10)
    x, t = torch.randn(2, *score.x_shape), torch.full((2,), 0.3)
    v_u, v_c = _unet_outputs(pipe, score, x, t)
    with torch.no_grad():
        v = v_u + 3.0 * (v_c - v_u)
        alpha, sigma = float(score.sde.alpha(t)[0]), float(score.sde.sigma(t)[0])
        torch.testing.assert_close(score(x, t), -(alpha * v + sigma * x) / sigma, rtol=1e-5, atol=1e-5)


# (b) zero initialisation reproduces the pre-trained sampler ---------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_zero_init_reproduces_pretrained_samples(pipe, lora_rank):
    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0)
    g = torch.Generator().manual_seed(0)
    times = time_grid(4, spacing="quadratic")
    x_init = torch.randn(2, *score.x_shape, generator=g)
    noise = torch.randn(4, 2, *score.x_shape, generator=g)
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        s_ref = score(x_init, t)
        ref = euler_maruyama(score.sde, score, x_init, times, noise=noise).x
    model = UNetAugmentedScore(score, (4,), lora_rank=lora_rank)
    y = torch.tensor([[0], [3]])
    with torch.no_grad():
        assert torch.equal(model(x_init, t, y), s_ref)
        out = euler_maruyama(score.sde, model.conditioned(y), x_init, times, noise=noise)
    assert torch.equal(out.x, ref)
    assert torch.equal(out.kl, torch.zeros(2))


def _unet_outputs(pipe, score, x, t):
    """The pipeline UNet's unconditional and text-conditioned outputs at (x, t), with its own prompt embeddings."""
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 2, True)
    with torch.no_grad():
        ts = score.sde.timestep(t)
        unconditional = pipe.unet(x, ts, encoder_hidden_states=uncond).sample
        return unconditional, pipe.unet(x, ts, encoder_hidden_states=cond).sample


def test_guidance_matches_pipeline_formula(pipe):
    """eps = eps_uncond + w (eps_text - eps_uncond) with the pipeline's own text embeddings."""
    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0)
    x, t = torch.randn(2, *score.x_shape), torch.full((2,), 0.3)
    e_u, e_c = _unet_outputs(pipe, score, x, t)
    with torch.no_grad():
        expected = score.sde.score_from_eps(e_u + 3.0 * (e_c - e_u), t)
        torch.testing.assert_close(score(x, t), expected, rtol=1e-5, atol=1e-5)


# (c) one CTRL step trains the label pathway only ---------------------------------------------------------------------


def test_one_ctrl_step_changes_only_the_label_pathway(pipe):
    torch.manual_seed(0)
    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0, gradient_checkpointing=True)
    model = UNetAugmentedScore(score, (4,), lora_rank=2)
    classifier = CalibratedClassifier(CompressibilityCNN(channels=(8, 8)), temperature=1.5).requires_grad_(False)
    reward = latent_reward(LatentDecoder(pipe.vae), [classifier])
    frozen = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    frozen |= {f"vae.{k}": v.clone() for k, v in pipe.vae.state_dict().items()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("embedding.") or "lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}

    y = torch.tensor([[0], [3]])
    est = pathwise_loss(model, score.sde, reward, y, score.x_shape, n_steps=3, spacing="quadratic",
                        generator=torch.Generator().manual_seed(0))
    est.loss.backward()
    emb_grad = model.embedding.tables[0].weight.grad
    assert emb_grad[0].abs().sum() > 0 and emb_grad[3].abs().sum() > 0  # requested classes get a gradient
    assert emb_grad[[1, 2, 4]].abs().sum() == 0  # unrequested classes and the null row do not
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    assert all(p.grad is None for p in list(pipe.unet.parameters()) + list(pipe.vae.parameters())
               if not p.requires_grad)

    torch.optim.Adam(trainable.values(), lr=1e-2).step()
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert any(n.startswith("embedding.") for n in changed) and any("lora_B" in n for n in changed)
    after = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()} | {
        f"vae.{k}": v for k, v in pipe.vae.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_unet_checkpointing_gives_the_same_gradient_with_lora(pipe):
    """The s_pre pass (LoRA off) must be recomputed with LoRA off (adapter_state_checkpoint)."""
    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0)
    model = UNetAugmentedScore(score, (4,), lora_rank=2)
    _fill_pathway(model)
    reward = latent_reward(LatentDecoder(pipe.vae), [CompressibilityCNN(channels=(8, 8))])
    y = torch.tensor([[1], [2]])
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            SDLatentScore(pipe.unet, score.sde, score.prompt_embeds, score.negative_prompt_embeds,
                          guidance_scale=3.0, gradient_checkpointing=True)
        model.zero_grad()
        est = pathwise_loss(model, score.sde, reward, y, score.x_shape, n_steps=2, memory="full",
                            generator=torch.Generator().manual_seed(0))
        est.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert pipe.unet.is_gradient_checkpointing and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


# (d) save -> load round trip ------------------------------------------------------------------------------------------


def test_adapter_round_trip_gives_identical_scores(pipe, sd_path, tmp_path):
    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0)
    model = UNetAugmentedScore(score, (4, 2), lora_rank=2)
    _fill_pathway(model)
    folder = save_adapter(model, tmp_path / "ctrl", base_model=sd_path, label_names=["jpeg", "aesthetic"],
                          prompt=PROMPT, guidance_scale=3.0)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert meta["n_classes"] == [4, 2] and meta["lora_rank"] == 2 and meta["label_names"] == ["jpeg", "aesthetic"]
    assert not (folder / "unet").exists()  # the pipeline's own files are referenced, not copied
    # ... by a path relative to the adapter folder, so that both move together (never an absolute path).
    assert meta["base_model"] == os.path.relpath(sd_path, folder) and not os.path.isabs(meta["base_model"])

    fresh = load_pipeline(sd_path)
    loaded = load_adapter(SDLatentScore.from_pipeline(fresh, PROMPT, guidance_scale=3.0), folder)
    x, t = torch.randn(3, *score.x_shape), torch.tensor([0.9, 0.5, 0.1])
    y = torch.tensor([[0, 1], [3, -1], [-1, -1]])
    with torch.no_grad():
        s, s_loaded = model(x, t, y), loaded(x, t, y)
    assert torch.equal(s, s_loaded)
    assert not torch.equal(s[0], loaded._pretrained(x, t)[0])  # the loaded pathway is not the zero one

    pipe2, model2 = load_finetuned(folder)  # the base pipeline found through the JSON
    assert model2.n_classes == (4, 2)
    with requested_labels(model, [[3, 1]]):
        images = _pipeline_images(pipe)
    with requested_labels(model2, [[3, 1]]):
        images_loaded = _pipeline_images(pipe2)
    np.testing.assert_array_equal(images_loaded, images)


def test_adapter_lora_part_is_peft_format_that_diffusers_loads(pipe, sd_path, tmp_path):
    """The LoRA part of a saved adapter is a peft adapter: diffusers' own load_lora_adapter gives the same UNet."""
    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0)
    model = UNetAugmentedScore(score, (4,), lora_rank=2)
    _fill_pathway(model)
    import shutil

    shutil.copytree(sd_path, tmp_path / "project" / "sd")  # a pipeline and its adapter side by side
    folder = save_adapter(model, tmp_path / "project" / "ctrl", base_model=tmp_path / "project" / "sd")
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["base_model"] == "../sd"
    peft_config = json.loads((folder / "adapter_config.json").read_text())
    assert peft_config["r"] == 2 and peft_config["peft_type"] == "LORA"
    plain = load_pipeline(sd_path).unet
    plain.load_lora_adapter(str(folder), prefix=None, adapter_name="ctrl", weight_name="adapter_model.safetensors")
    x, ts = torch.randn(2, *score.x_shape), torch.tensor([10.0, 500.0])
    text = torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = pipe.unet(x, ts, encoder_hidden_states=text).sample  # LoRA on, no label embedding installed
        assert torch.equal(plain(x, ts, encoder_hidden_states=text).sample, expected)
    # Moved together, the adapter still finds its pipeline, and samples as before.
    (tmp_path / "project").rename(tmp_path / "moved")
    pipe2, moved = load_finetuned(tmp_path / "moved" / "ctrl")
    with requested_labels(model, [[2]]):
        images = _pipeline_images(pipe)
    with requested_labels(moved, [[2]]):
        np.testing.assert_array_equal(_pipeline_images(pipe2), images)


def test_version_1_adapter_folders_still_load(pipe, sd_path, tmp_path):
    """Folders written before the peft format: LoRA inside ctrl_adapter.safetensors, the base by absolute path."""
    from safetensors.torch import save_file

    from domains.images.stable_diffusion import _trainable_state

    score = SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0)
    model = UNetAugmentedScore(score, (4,), lora_rank=2)
    _fill_pathway(model)
    folder = save_adapter(model, tmp_path / "v1", base_model=sd_path)
    save_file({k: v.detach().contiguous() for k, v in _trainable_state(model).items()}, str(folder / ADAPTER_WEIGHTS))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / name).unlink()
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**meta, "version": 1, "base_model": str(sd_path.resolve())}))
    assert load_finetuned(folder)[1].lora_rank == 2  # the absolute base path of version 1 is followed
    loaded = load_adapter(SDLatentScore.from_pipeline(load_pipeline(sd_path), PROMPT, guidance_scale=3.0), folder)
    x, t, y = torch.randn(2, *score.x_shape), torch.tensor([0.7, 0.2]), torch.tensor([[1], [3]])
    with torch.no_grad():
        assert torch.equal(loaded.score_and_control(x, t, y)[0], model.score_and_control(x, t, y)[0])


# (e) sampling through a normal pipeline call --------------------------------------------------------------------------


def test_pipeline_call_with_labels_at_zero_init_equals_unlabelled(pipe):
    reference = _pipeline_images(pipe, n=2)
    model = UNetAugmentedScore(SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0), (4,), lora_rank=2)
    with requested_labels(model, [[0], [2]]):
        labelled = _pipeline_images(pipe, n=2)
    assert labelled.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(labelled, reference)


def test_pipeline_call_uses_the_requested_labels(pipe, tmp_path):
    reference = _pipeline_images(pipe)
    model = UNetAugmentedScore(SDLatentScore.from_pipeline(pipe, PROMPT, guidance_scale=3.0), (4,), lora_rank=2)
    _fill_pathway(model)
    with requested_labels(model, [[1]]):
        labelled = _pipeline_images(pipe)
    with requested_labels(model, [[-1]]):  # a null request is the pre-trained model, LoRA switched off
        null = _pipeline_images(pipe)
    assert not np.array_equal(labelled, reference)
    np.testing.assert_array_equal(null, reference)
    with pytest.raises(ValueError, match="0..3"):
        with requested_labels(model, [[4]]):
            pass


# (f) the exact compressibility label ---------------------------------------------------------------------------------


def test_jpeg_kb_class_on_known_images():
    rng = np.random.default_rng(0)
    grey = np.full((1, 512, 512, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    assert jpeg_kb(grey)[0] < 60 and jpeg_kb_class(grey).tolist() == [3]
    assert jpeg_kb(noise)[0] > 110 and jpeg_kb_class(noise).tolist() == [0]
    assert jpeg_kb_class(np.concatenate([noise, grey])).tolist() == [0, 3]
    assert to_uint8(torch.zeros(1, 3, 4, 4)).tolist() == np.full((1, 4, 4, 3), 128).tolist()
    with pytest.raises(ValueError, match="uint8 RGB"):
        jpeg_kb(np.zeros((1, 3, 8, 8), np.float32))


# reward models -------------------------------------------------------------------------------------------------------


def test_reward_models_round_trip_and_calibrate(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cnn = CompressibilityCNN(channels=(8, 8))
    save_reward_model(cnn, tmp_path / "cnn", temperature=2.0)
    clf = load_compressibility_classifier(tmp_path / "cnn")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(clf(images), torch.log_softmax(cnn(images) / 2.0, 1))

    clip_cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                image_size=16, patch_size=8, projection_dim=8)
    CLIPVisionModelWithProjection(clip_cfg).save_pretrained(tmp_path / "clip")
    mlp = AestheticMLP(input_dim=8, hidden=(16, 4), dropout=(0.2, 0.0)).eval()
    scores = torch.tensor([4.0, 5.7, 7.0, 6.5])
    labels = torch.tensor([0, 1, 1, 0])
    temperature = fit_temperature(aesthetic_logits(scores, 5.7), labels)
    assert temperature > 0
    save_reward_model(mlp, tmp_path / "aesthetic", temperature=temperature)
    aesthetic = load_aesthetic_classifier(tmp_path / "aesthetic", tmp_path / "clip")
    assert isinstance(aesthetic, AestheticClassifier)
    images = (torch.rand(2, 3, 24, 20) * 2 - 1).requires_grad_(True)
    logp = aesthetic(images)
    expected = torch.nn.functional.logsigmoid((aesthetic.score(images) - 5.7) / temperature)
    torch.testing.assert_close(logp[:, 1], expected)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2))
    logp[:, 1].sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable down to the pixels (CLIP pre-processing included)
    assert math.isclose(float(aesthetic.temperature), temperature)


# (g) missing paths: one clear line ------------------------------------------------------------------------------------


def test_missing_paths_give_one_clear_line(tmp_path, sd_path):
    import shutil

    missing = tmp_path / "nowhere"
    for load in (load_pipeline, load_reward_model, load_clip_vision):
        with pytest.raises(FileNotFoundError, match="nowhere") as err:
            load(missing)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="ctrl_config.json"):
        load_finetuned(missing)
    broken = tmp_path / "broken"
    shutil.copytree(sd_path, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match="component 'unet'") as err:
        load_pipeline(broken)
    assert "\n" not in str(err.value)
    (broken / "unet").mkdir()  # the folder is there, its files are not: diffusers' own error, kept to one line
    with pytest.raises(FileNotFoundError, match="broken") as err:
        load_pipeline(broken)
    assert "\n" not in str(err.value)


def test_one_jpeg_sizer_for_grey_patches_and_rgb_images():
    from domains.images.data import jpeg_bytes

    rng = np.random.default_rng(0)
    rgb = (rng.random((3, 32, 32, 3)) * 255).astype(np.uint8)
    grey = (rng.random((3, 16, 16)) * 255).astype(np.uint8)
    # Stable Diffusion's kB are the patches' sizer in units of 1000 bytes.
    np.testing.assert_array_equal(jpeg_kb(rgb) * 1000, jpeg_bytes(rgb, quality=95))
    flat = np.full((1, 16, 16), 128, np.uint8)
    assert jpeg_bytes(grey).dtype == np.int64 and (jpeg_bytes(grey) > jpeg_bytes(flat)[0]).all()
    with pytest.raises(ValueError, match="uint8 images"):
        jpeg_bytes(rgb[..., :2])
