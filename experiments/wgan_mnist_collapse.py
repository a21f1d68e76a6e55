"""Why a clipped critic collapses the generator: statistics of a wgan_mnist.py checkpoint on 256 latents.

    PYTHONPATH=. python experiments/wgan_mnist_collapse.py runs/<run> [extra wgan_mnist flags]

grad_cosine: mean pairwise cosine similarity of dD/dx at the generated images (1 = the critic pushes every
sample the same way); pre_tanh_abs: mean |pre-tanh value| of the generator; saturated: share of pixels with
|pre-tanh| > 3; batch_std: std over the batch of the generated images, averaged over pixels. Train-mode
BatchNorm in both nets, as in a training step.
"""
import json
import sys

import torch
import torch.nn.functional as F

import wgan_mnist as wm

args = wm.parse_args(["--resume", sys.argv[1], *sys.argv[2:], "--device", "cpu"])
ckpt = wm.load_checkpoint(args.resume)
generator, critic = wm.Generator(args), wm.Critic(args)
generator.load_state_dict(ckpt["generator"])
critic.load_state_dict(ckpt["critic"])
z = torch.randn(256, args.latent_dim, generator=torch.Generator().manual_seed(0))
pre_tanh = generator.net[:-1](z).detach()
fake = torch.tanh(pre_tanh).requires_grad_(True)
(grad,) = torch.autograd.grad(critic(fake).sum(), fake)
g = F.normalize(grad.flatten(1), dim=1)
n = g.shape[0]
print(json.dumps({"run": sys.argv[1], "step": ckpt["step"], "critic_norm": args.critic_norm,
                  "grad_cosine": round(((g @ g.T).sum().item() - n) / (n * (n - 1)), 4),
                  "pre_tanh_abs": round(pre_tanh.abs().mean().item(), 3),
                  "saturated": round((pre_tanh.abs() > 3).float().mean().item(), 3),
                  "batch_std": round(fake.detach().std(0).mean().item(), 4)}))
