"""What holds a clipped critic back: a wgan_mnist.py checkpoint's critic against the same critic trained to
convergence on its frozen generator, and against fresh critics at other clip values.

    PYTHONPATH=. python experiments/wgan_mnist_critic.py runs/<run> [--steps 3000] [--clips 0.01,0.05,0.1]

One JSON line per critic:
  estimate: mean D(real) - mean D(fake) over 20 held batches of 256 (train-mode BatchNorm, as in training);
  lipschitz: mean ||dD/dx|| at random interpolates of real and fake, a lower estimate of the critic's constant;
  normalized: estimate / lipschitz, an estimate of W1 on the same scale for every clip value (a full-capacity
    critic would reach the data's W1; a clipped one less);
  fake_grad: mean ||dD/dx|| at the fakes, the signal the generator gets; grad_cosine: mean pairwise cosine of it
    (1: the same push for every sample); gen_grad: norm of the generator's parameter gradient of -mean D(G(z));
  at_bound: share of critic parameters at +-c, per layer and in all; max_abs: the largest |parameter|.
Rows: "run" (the checkpoint's critic), "run+N" (it, trained N more critic steps, its RMSprop state kept, on the
frozen generator: its estimate after N over the run's is how far from converged the run's critic was) and
"fresh c=..." (a new critic trained N steps at clip c; the checkpoint's lr and optimizer). One thread.
"""
import argparse
import copy
import json

import torch
import torch.nn.functional as F

import wgan_mnist as wm

cli = argparse.ArgumentParser()
cli.add_argument("run")
cli.add_argument("--steps", type=int, default=3000, help="critic steps for run+N and each fresh critic")
cli.add_argument("--clips", default="0.01,0.05,0.1", help="clip values of the fresh critics")
cli.add_argument("--data", default=None, help="MNIST root, if not the run's")
opts = cli.parse_args()
torch.set_num_threads(1)
args = wm.parse_args(["--resume", opts.run, "--device", "cpu"] + (["--data", opts.data] if opts.data else []))
ckpt = wm.load_checkpoint(args.resume)
generator, critic = wm.Generator(args), wm.Critic(args)
generator.load_state_dict(ckpt["generator"])
critic.load_state_dict(ckpt["critic"])
generator.requires_grad_(False)
images = wm.load_split(args, train=True)
train_batches = wm.Batches(images, args.batch_size, 7)
held = torch.Generator().manual_seed(0)
held_real = [images[torch.randint(len(images), (256,), generator=held)].unsqueeze(1).float() / 127.5 - 1
             for _ in range(20)]
held_fake = [generator(torch.randn(256, args.latent_dim, generator=held)) for _ in range(20)]


def input_grad(net, x):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).sum(), x)
    return grad.flatten(1)


def measure(name, net, clip, steps_done):
    net = copy.deepcopy(net)  # train-mode BatchNorm updates its running statistics: keep the caller's
    with torch.no_grad():
        estimate = sum(net(r).mean() - net(f).mean() for r, f in zip(held_real, held_fake)) / len(held_real)
    alpha = torch.rand(256, 1, 1, 1, generator=held)
    lipschitz = sum(input_grad(net, r + alpha * (f - r)).norm(dim=1).mean() for r, f in zip(held_real, held_fake))
    lipschitz = lipschitz / len(held_real)
    g = input_grad(net, held_fake[0])
    cos = F.normalize(g, dim=1)
    generator.requires_grad_(True)
    generator.zero_grad()
    (-net(generator(torch.randn(256, args.latent_dim, generator=held))).mean()).backward()
    gen_grad = torch.sqrt(sum(p.grad.pow(2).sum() for p in generator.parameters()))
    generator.requires_grad_(False)
    layers = {n: round((p.abs() >= clip).float().mean().item(), 3) for n, p in net.named_parameters()}
    total = sum((p.abs() >= clip).sum().item() for p in net.parameters()) / sum(p.numel() for p in net.parameters())
    print(json.dumps({"critic": name, "ckpt_step": ckpt["step"], "critic_steps": steps_done,
                      "estimate": round(estimate.item(), 6), "lipschitz": round(lipschitz.item(), 6),
                      "normalized": round((estimate / lipschitz).item(), 3),
                      "fake_grad": round(g.norm(dim=1).mean().item(), 6),
                      "grad_cosine": round(((cos @ cos.T).sum().item() - len(g)) / (len(g) * (len(g) - 1)), 4),
                      "gen_grad": round(gen_grad.item(), 6), "at_bound": round(total, 3),
                      "max_abs": max(p.abs().max().item() for p in net.parameters()), "layers": layers}),
          flush=True)


def train(net, opt, clip, steps, name):
    run_args = copy.copy(args)
    run_args.clip_value = clip
    for i in range(1, steps + 1):
        wm.critic_step(generator, net, opt, train_batches.next(), run_args)
        if i in (steps // 10, steps // 3, steps):
            measure(f"{name}+{i}", net, clip, i)


measure("run", critic, args.clip_value, ckpt["critic_steps"])
trained = copy.deepcopy(critic)
_, opt = wm.make_optimizers(generator, trained, args)
opt.load_state_dict(ckpt["opt_critic"])
train(trained, opt, args.clip_value, opts.steps, "run")
for clip in map(float, opts.clips.split(",")):
    torch.manual_seed(1)
    fresh = wm.Critic(args)
    with torch.no_grad():
        for p in fresh.parameters():
            p.clamp_(-clip, clip)
    _, opt = wm.make_optimizers(generator, fresh, args)
    train(fresh, opt, clip, opts.steps, f"fresh c={clip}")
