"""Budget curve of CTRL's full-gradient pathwise estimator on DNA cell type (issue 23).

Trains the suite's zero-initialised label pathway by backpropagation of J = gamma E[log p(y|x0)] - alpha KL through
the whole 50-step sampler (``memory=checkpoint``: the exact gradient, activations recomputed), and every
``--eval-every`` updates samples 256 balanced requests and scores them as the suite does: the oracle's accuracy on
the decoded sequences, the reward classifier's on the continuous end points and on the decoded sequences (far
above the oracle's means the gradient found what fools the classifier), and the sampler's KL. The reward
classifier is the suite's (same pairs and seeds); it is cached in ``--cache`` so that repeated probes share it.

    python benchmarks/dna/pathwise_budget.py --updates 400 --eval-every 50 --batch-size 32 --lr 1e-3
"""
import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ctrl_bio.estimators import Objective, Pathwise, Problem
from ctrl_bio.labels import build_classifier, fit_reward_classifier, load_label
from ctrl_bio.reward import CalibratedClassifier, LabelPrior, LogLikelihoodReward
from ctrl_bio.rows import balanced_requests
from ctrl_bio.sampling import euler_maruyama, time_grid
from domains.dna.domain import DNADomain
from domains.dna.oracle import load_oracle

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--updates", type=int, default=400)
parser.add_argument("--eval-every", type=int, default=50)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--gamma", type=float, default=4.0)
parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, as ctrl_bio.finetune.train")
parser.add_argument("--memory", default="checkpoint", choices=["checkpoint", "full", "truncate"])
parser.add_argument("--grad-last-k", type=int, default=10)
parser.add_argument("--train-steps", type=int, default=50,
                    help="sampler steps of the training paths (evaluation always samples the suite's 50)")
parser.add_argument("--n-eval", type=int, default=256)
parser.add_argument("--pathway", default="conv", help="the domain's pathway kind (conv | embedding | lora)")
parser.add_argument("--cache", default="/tmp/ctrl_probe")
parser.add_argument("--out", default=None, help="JSON lines of the curve (default: <cache>/pathwise_<settings>.jsonl)")
args = parser.parse_args()
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
cache = Path(args.cache)
cache.mkdir(parents=True, exist_ok=True)
suite_cfg = yaml.safe_load(open(ROOT / "configs/domain/dna.yaml"))
domain = DNADomain(pathway={**suite_cfg.get("pathway", {}), "kind": args.pathway})
spec = yaml.safe_load(open(ROOT / "configs/label/celltype.yaml"))
spec["pairs"]["n"] = 7877
pairs = load_label(spec, domain=domain, seed=7919)  # load_task: seed + 7919 (k + 1)
classifier_path = cache / "celltype_reward.safetensors"
if classifier_path.exists():  # weights only: the network is rebuilt from the label's config
    classifier = CalibratedClassifier(build_classifier(spec, pairs.x.shape[1:], pairs.n_classes))
    classifier.load_state_dict(load_file(str(classifier_path)))
else:  # the suite's seeds: fit_reward_classifiers seeds label k with seed + 17 (k + 1)
    classifier, report = fit_reward_classifier(pairs, spec, seed=17)
    print(report, flush=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(classifier_path))
classifier.eval()
reward = LogLikelihoodReward([classifier])
prior = LabelPrior.from_labels([pairs.y], [4])
torch.manual_seed(0)
model = domain.augment(domain.pretrained_model(), [4])
problem = Problem(model, domain.sde, reward, prior, domain.x_shape, Objective(gamma=args.gamma),
                  n_steps=args.train_steps)
estimator = Pathwise(steps=args.updates, batch_size=args.batch_size, lr=args.lr, memory=args.memory,
                     grad_last_k=args.grad_last_k)
oracle = load_oracle()
y_eval = balanced_requests((4,), args.n_eval)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.Adam(params, lr=args.lr)
generator = torch.Generator().manual_seed(1)
name = (f"pathwise_{args.pathway}_{args.memory}_b{args.batch_size}_lr{args.lr:g}_g{args.gamma:g}"
        f"_n{args.train_steps}")
out_path = Path(args.out) if args.out else cache / f"{name}.jsonl"
out = open(out_path, "w")


def evaluate(update: int, seconds: float) -> None:
    g = torch.Generator().manual_seed(2000)
    with torch.no_grad():
        res = euler_maruyama(domain.sde, model.conditioned(y_eval),
                             domain.sde.prior_sampling((args.n_eval, *domain.x_shape), generator=g),
                             time_grid(50), generator=g, keep_trajectory=False)
        x = domain.project(res.x)
        row = {"update": update, "seconds": round(seconds, 1),
               "oracle_accuracy": float((oracle(x).argmax(1) == y_eval[:, 0]).float().mean()),
               "reward_accuracy": float((classifier(res.x).argmax(1) == y_eval[:, 0]).float().mean()),
               "reward_accuracy_decoded": float((classifier(x).argmax(1) == y_eval[:, 0]).float().mean()),
               "log_p_decoded": float(reward(x, y_eval).mean()), "kl": float(res.kl.mean())}
        row["objective_decoded"] = float(Objective(gamma=args.gamma).value(reward(x, y_eval), res.kl).mean())
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    out.flush()


train_seconds = 0.0
evaluate(0, 0.0)
for update in range(1, args.updates + 1):
    start = time.perf_counter()
    y = prior.sample(args.batch_size, generator)
    loss = estimator.loss(problem, y, generator)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    train_seconds += time.perf_counter() - start
    if update % 10 == 0:
        print(f"update {update} loss {loss.item():.3f} ({train_seconds / update:.2f} s/update)", flush=True)
    if update % args.eval_every == 0:
        evaluate(update, train_seconds)
