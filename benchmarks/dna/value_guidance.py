"""How good is the learned soft value function on DNA cell type, before any distillation?

Fits :class:`ctrl_bio.estimators.SoftValue`'s value network V(x_t, t, y) = log E[p(y|x0)^gamma | x_t] on the
pre-trained model's training sequences (the suite's ``pool: training``), then samples the 50-step sampler guided by
s_pre + grad V (no pathway) for 256 balanced requests and scores them with the evaluation oracle. What the pathway
can reach by distilling grad V is at most this.

    python benchmarks/dna/value_guidance.py --value-steps 1500 --spacing uniform
    python benchmarks/dna/value_guidance.py --value-model denoised_reward --value-steps 1000 --lr 1e-2 --scales 1

``--value-model denoised_reward`` fits :class:`ctrl_bio.estimators.soft_value.DenoisedRewardValue` instead (the reward
classifier at the pre-trained denoiser's estimate, its scale a(t) and offsets fitted) and prints the fitted a(t).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from ctrl_bio.estimators import Objective, Problem, SoftValue
from ctrl_bio.estimators.soft_value import DenoisedRewardValue
from ctrl_bio.reward import LogLikelihoodReward
from ctrl_bio.rows import balanced_requests
from ctrl_bio.sampling import euler_maruyama, time_grid
from domains.dna.oracle import load_oracle

sys.path.insert(0, str(Path(__file__).parent))
from tilted_target import celltype_value_setup  # noqa: E402

from domains.dna.suite import NoisySequenceCNN

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--value-steps", type=int, default=1500)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--hidden", type=int, default=64)
parser.add_argument("--spacing", default="uniform")
parser.add_argument("--gamma", type=float, default=4.0)
parser.add_argument("--scales", type=float, nargs="*", default=[1.0, 2.0])
parser.add_argument("--value-model", choices=["noisy_classifier", "denoised_reward"], default="noisy_classifier")
parser.add_argument("--pool-size", type=int, default=8192, help="training sequences V is fitted on (39,254: all)")
args = parser.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
domain, classifier, prior, pool = celltype_value_setup(args.pool_size)
reward = LogLikelihoodReward([classifier])
model = domain.augment(domain.pretrained_model(), [4]).eval()
problem = Problem(model, domain.sde, reward, prior, domain.x_shape, Objective(gamma=args.gamma), n_steps=50)
if args.value_model == "denoised_reward":
    value_net = DenoisedRewardValue(domain.pretrained_model(), domain.sde, [classifier], torch.arange(4)[:, None])
else:
    value_net = NoisySequenceCNN(4, hidden=args.hidden)
sv = SoftValue(value_steps=args.value_steps, value_batch_size=args.batch_size, value_lr=args.lr, pool_x0=pool,
               value_net=value_net, spacing=args.spacing, progress=False)
start = time.perf_counter()
info = sv.prepare(problem, torch.Generator().manual_seed(1))
fit_seconds = time.perf_counter() - start
if args.value_model == "denoised_reward":
    grid = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9])
    print("fitted a(t):", {round(t, 2): round(a, 3) for t, a in zip(grid.tolist(), value_net.scale(grid).tolist())})
oracle = load_oracle()
y = balanced_requests((4,), 256)
pre = domain.pretrained_model()
for scale in [0.0, *args.scales]:
    def score(x, t, scale=scale):
        s = pre(x, t)
        if not scale:
            return s
        u = scale * sv.control(problem, x, t, y)
        return s + u, u
    g = torch.Generator().manual_seed(2000)
    out = euler_maruyama(domain.sde, score, domain.sde.prior_sampling((256, *domain.x_shape), generator=g),
                         time_grid(50), generator=g, keep_trajectory=False)
    with torch.no_grad():
        x = domain.project(out.x.detach())  # argmax one-hot: what the oracle and the FASTA see
        acc = float((oracle(x).argmax(1) == y[:, 0]).float().mean())
        # The reward classifier's own view, on the sampler's continuous end points and on the decoded sequences:
        # far above the oracle's accuracy means the guidance found what fools the classifier, not cell-type grammar.
        reward_acc = float((classifier(out.x.detach()).argmax(1) == y[:, 0]).float().mean())
        reward_acc_decoded = float((classifier(x).argmax(1) == y[:, 0]).float().mean())
    print(f"{args.value_model}: pool {pool.shape[0]} value steps {args.value_steps} spacing {args.spacing} "
          f"hidden {args.hidden} (fit {fit_seconds:.0f} s, "
          f"loss {info['value_losses'][0]:.3f} -> {info['value_losses'][-1]:.3f}) | scale {scale}: oracle accuracy "
          f"{acc:.3f}, reward classifier {reward_acc:.3f} (decoded {reward_acc_decoded:.3f}), KL "
          f"{float(out.kl.mean()):.2f}", flush=True)
