"""Why does grad V, which steers DNA toward the requested cell type when it guides the sampler, not survive distillation
into the label pathway? A probe of where in t the control matters and where the distilled pathway misses it.

1. Fits the calibrated soft value (:class:`ctrl_bio.estimators.soft_value.DenoisedRewardValue`) as
   ``value_guidance.py --value-model denoised_reward`` does (cached in ``--cache``), and draws the guided paths.
2. Guidance switched on only below / above a time t_c: which part of the path carries the cell-type signal.
3. Distils grad V into the suite's pathway on the guided states with the loss weighted by sigma_t^2 (the library's
   noise units) or by beta_t (the path KL's own weighting, KL = E int beta_t / 2 ||u - u*||^2 dt for the VP-SDE),
   and reports per t bin the relative fit error on held-out guided states, the KL between the distilled and the
   guided sampler along those paths, the same error on the states it was fitted on, and the distilled sampler's
   oracle accuracy. Before that it prints what grad V looks like at t in [0.1, 0.3): how much of it sits on a few
   positions and how alike two states' controls are.

``--target label_constant`` replaces grad V by a fixed random control per label of about its size (a control on
the pathway: one that cannot fit even that is broken); ``--t-range`` fits on the states of one range of t only. The
recorded runs (benchmarks/dna/README.md, output in benchmarks/estimators/probes/dna_value_distillation/):

    python benchmarks/dna/value_distillation.py --weighting sigma2 beta --steps 400
    python benchmarks/dna/value_distillation.py --weighting sigma2 --steps 1500 --lr 5e-3 --cut
    python benchmarks/dna/value_distillation.py --target label_constant --weighting sigma2 --steps 300 \
        --batch-size 64 --lr 2e-4 --t-range 0.1 0.3 --cut
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from ctrl_bio.estimators import Objective, Problem, SoftValue
from ctrl_bio.estimators.soft_value import DenoisedRewardValue, GuidedStates
from ctrl_bio.reward import LogLikelihoodReward
from ctrl_bio.rows import balanced_requests
from ctrl_bio.sampling import euler_maruyama, time_grid
from ctrl_bio.utils import sum_except_batch
from domains.dna.oracle import load_oracle

sys.path.insert(0, str(Path(__file__).parent))
from tilted_target import celltype_value_setup  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--value-steps", type=int, default=1000)
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--weighting", nargs="*", default=["sigma2", "beta"])
parser.add_argument("--t-range", type=float, nargs=2, default=[0.0, 1.01],
                    help="fit the pathway on the guided states with t in [lo, hi) only")
parser.add_argument("--target", choices=["grad_v", "label_constant"], default="grad_v",
                    help="label_constant: a random fixed control per label instead of grad V (a pathway that cannot "
                         "fit even this is broken)")
parser.add_argument("--cut", type=float, nargs="*", default=[0.1, 0.2])
parser.add_argument("--guided-paths", type=int, default=512)
parser.add_argument("--cache", default="runs/vd/cache.pt")
parser.add_argument("--pathway", default="conv", help="the suite's domain.pathway.kind (conv, copy, lora, embedding)")
args = parser.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
domain, classifier, prior, pool = celltype_value_setup(8192)
reward = LogLikelihoodReward([classifier])
pre = domain.pretrained_model()
sde = domain.sde
value_net = DenoisedRewardValue(pre, sde, [classifier], torch.arange(4)[:, None])
sv = SoftValue(value_steps=args.value_steps, value_batch_size=128, value_lr=1e-2, pool_x0=pool, value_net=value_net,
               distill_on="guided", guided_paths=args.guided_paths + 256, progress=False)
problem = Problem(domain.augment(pre, [4]).eval(), sde, reward, prior, domain.x_shape, Objective(gamma=4.0),
                  n_steps=50)
cache = Path(args.cache)
if cache.exists():
    state = torch.load(cache, weights_only=True)
    value_net.calibration.load_state_dict(state["calibration"])
    sv.value_net = value_net.eval().requires_grad_(False)
    sv.guided = GuidedStates(**state["guided"])
else:
    start = time.perf_counter()
    info = sv.prepare(problem, torch.Generator().manual_seed(1))
    print(f"value fit + guided paths: {time.perf_counter() - start:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    g = sv.guided
    torch.save({"calibration": value_net.calibration.state_dict(),
                "guided": {"x": g.x, "t": g.t, "y": g.y, "control": g.control, "kl": g.kl,
                           "log_likelihood": g.log_likelihood, "n_classes": g.n_classes}}, cache)
guided = sv.guided
assert guided.x.shape[0] == 50 * (args.guided_paths + 256), "one stored state per path and step"
if args.target == "label_constant":
    scale = float(guided.control[(guided.t >= 0.1) & (guided.t < 0.3)].flatten(1).norm(dim=1).mean()) / 40.0
    pattern = torch.randn(4, *domain.x_shape, generator=torch.Generator().manual_seed(13)) * scale
    guided = GuidedStates(guided.x, guided.t, guided.y, pattern[guided.y[:, 0]], guided.kl, guided.log_likelihood,
                          guided.n_classes)
print(f"guided paths: KL {guided.kl:.2f}, log-likelihood {guided.log_likelihood:.2f}, states {guided.x.shape[0]}")

# Held-out guided paths: the last 256 of the stored ones (the paths are stored step-major within each batch).
n_paths = args.guided_paths + 256
path_id = torch.cat([torch.arange(start, min(start + 128, n_paths)).repeat(50) for start in range(0, n_paths, 128)])
held = path_id >= args.guided_paths
fitted = ~held & (guided.t >= args.t_range[0]) & (guided.t < args.t_range[1])
train_states = GuidedStates(guided.x[fitted], guided.t[fitted], guided.y[fitted], guided.control[fitted],
                            guided.kl, guided.log_likelihood, guided.n_classes)
bins = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.01])
t_held, u_held = guided.t[held], guided.control[held]
h = 1.0 / 50


def per_bin(values: torch.Tensor) -> list[float]:
    return [float(values[(t_held >= lo) & (t_held < hi)].mean()) for lo, hi in zip(bins[:-1], bins[1:])]


def per_bin_sum(values: torch.Tensor) -> list[float]:
    return [float(values[(t_held >= lo) & (t_held < hi)].sum()) / 256 for lo, hi in zip(bins[:-1], bins[1:])]


beta_held = sde.beta(t_held)
target_kl = 0.5 * beta_held * h * sum_except_batch(u_held**2)
print("t bins:", [f"[{lo:.2f},{hi:.2f})" for lo, hi in zip(bins[:-1].tolist(), bins[1:].tolist())])
print("guided KL per path from each bin (sum of beta_t h / 2 ||grad V||^2):",
      [round(v, 3) for v in per_bin_sum(target_kl)], f"total {float(target_kl.sum()) / 256:.2f}", flush=True)

# What grad V looks like where it carries the label: how concentrated on a few positions, how alike across states.
decisive = (guided.t >= 0.1) & (guided.t < 0.3)
u_dec, y_dec = guided.control[decisive].flatten(1), guided.y[decisive][:, 0]
per_position = (guided.control[decisive] ** 2).sum(1).sort(1, descending=True).values
pairs = torch.randperm(u_dec.shape[0], generator=torch.Generator().manual_seed(11))[:2000].view(2, 1000)
cosine = torch.nn.functional.cosine_similarity(u_dec[pairs[0]], u_dec[pairs[1]])
same = y_dec[pairs[0]] == y_dec[pairs[1]]
label_means = torch.stack([u_dec[y_dec == c].mean(0) for c in range(4)])
print(f"grad V at t in [0.1, 0.3): share of its squared norm on the top 10 / 20 of 200 positions "
      f"{float((per_position[:, :10].sum(1) / per_position.sum(1)).mean()):.3f} / "
      f"{float((per_position[:, :20].sum(1) / per_position.sum(1)).mean()):.3f}; cosine between two states' controls: "
      f"same label {float(cosine[same].mean()):.3f}, other label {float(cosine[~same].mean()):.3f}; share explained by "
      f"the per-label mean control {float(1 - ((u_dec - label_means[y_dec]) ** 2).sum() / (u_dec**2).sum()):.3f}",
      flush=True)

oracle = load_oracle()
y_eval = balanced_requests((4,), 256)


def sample(score_fn, seed: int = 2000) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    out = euler_maruyama(sde, score_fn, sde.prior_sampling((256, *domain.x_shape), generator=g), time_grid(50),
                         generator=g, keep_trajectory=False)
    with torch.no_grad():
        acc = float((oracle(domain.project(out.x.detach())).argmax(1) == y_eval[:, 0]).float().mean())
    return acc, float(out.kl.mean())


for cut in args.cut:
    for side in ("below", "above"):
        def score(x, t, cut=cut, side=side):
            s = pre(x, t)
            on = float(t.reshape(-1)[0]) < cut if side == "below" else float(t.reshape(-1)[0]) >= cut
            if not on:
                return s
            u = sv.control(problem, x, t, y_eval)
            return s + u, u
        acc, kl = sample(score)
        print(f"guidance only {side} t={cut}: oracle accuracy {acc:.3f}, KL {kl:.2f}", flush=True)

for weighting in args.weighting:
    domain.pathway = {**domain.pathway, "kind": args.pathway}
    model = domain.augment(domain.pretrained_model(), [4])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    g = torch.Generator().manual_seed(3)
    start = time.perf_counter()
    for _ in range(args.steps):
        y = prior.sample(args.batch_size, g)
        x_t, t, target = train_states.draw(y, g)
        _, u = model.score_and_control(x_t, t, y)
        w = {"sigma2": sde.sigma(t) ** 2, "beta": sde.beta(t) * h, "unit": torch.ones_like(t)}[weighting]
        loss = (w * sum_except_batch((u - target) ** 2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    model.eval()
    errs, kls = [], []
    with torch.no_grad():
        for i in range(0, int(held.sum()), 512):
            sl = slice(i, i + 512)
            _, u = model.score_and_control(guided.x[held][sl], t_held[sl], guided.y[held][sl])
            err = sum_except_batch((u - u_held[sl]) ** 2)
            errs.append(err / sum_except_batch(u_held[sl] ** 2).clamp_min(1e-12))
            kls.append(0.5 * beta_held[sl] * h * err)
    rel, kl_steps = torch.cat(errs), torch.cat(kls)
    with torch.no_grad():  # the same on 2,048 of the states it was fitted on: fitting error against generalisation
        fit = torch.randperm(train_states.x.shape[0], generator=torch.Generator().manual_seed(5))[:2048]
        fit = fit[(train_states.t[fit] >= 0.1) & (train_states.t[fit] < 0.3)]
        u = torch.cat([model.score_and_control(train_states.x[i], train_states.t[i], train_states.y[i])[1]
                       for i in fit.split(512)])
        train_rel = float((sum_except_batch((u - train_states.control[fit]) ** 2)
                           / sum_except_batch(train_states.control[fit] ** 2)).mean())
    kl_gap = float(kl_steps.sum()) / 256

    def score(x, t, model=model):
        with torch.no_grad():
            return model.score_and_control(x, t, y_eval)

    acc, kl = sample(score)
    print(f"distilled ({weighting}, {args.steps} steps, {seconds:.0f} s, final loss {loss.item():.3f}): "
          f"relative error per bin {[round(v, 3) for v in per_bin(rel)]}, "
          f"on its own states at t in [0.1, 0.3) {train_rel:.3f}, "
          f"KL gap per bin {[round(v, 3) for v in per_bin_sum(kl_steps)]}, KL(distilled || guided) along guided paths "
          f"{kl_gap:.2f}; sampled: oracle accuracy {acc:.3f}, KL {kl:.2f}", flush=True)
