"""Critic-step time with and without the gradient penalty, and against a reference step written the common way.

For each script's models, at its default batch and a large one (sizes in conftest.SIZES follow the device):
  gp    the script's own critic_step with its penalty (as its main() sets it up: on CUDA TF32, channels_last
        and fused Adam where the script's main uses them)
  nogp  the script's critic_step in its penalty-free setting (Spec.nogp_argv; not every script has one)
  ref   a reference step written the common way: fake = G(z) with the generator graph kept and fake not
        detached, separate critic forwards for real, fake and interpolates, alpha per sample, autograd.grad,
        opt.zero_grad(set_to_none=False); PyTorch's default flags
The ref case first asserts, on a fixed seed, that the reference computes the same thing as the script: the same
penalty as the script's gradient_penalty on the same inputs, and the same losses and critic gradients for a
whole step (dropout off), so that the speed comparison compares equal math.
Bench-written variants also run (ablations, each asserted to do the reference's math: what each of the scripts'
choices buys; one, two or three critic passes); --bench-quick runs them at the default batch only.
"""
import copy
import importlib
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

CONFIGS = ("wgan_gp_64", "wgan_mnist", "noise_morph", "noise_morph_toy")  # the keys of conftest.SIZES


@dataclass
class Spec:
    module: str
    gp_argv: tuple  # flags for the penalty on, beyond the size flags
    nogp_argv: tuple  # flags for the script's penalty-free step
    nogp_note: str  # what the penalty-free step really is
    channels_last: bool  # what main() does on CUDA
    cudnn_benchmark: bool
    grouped_critic: bool  # critic(x, groups=k) keeps minibatch stddev within each of k concatenated parts

    def noise(self, module, args, n, device):
        if hasattr(module, "sample_z"):  # noise_morph: z ~ U(-1, 1)^d
            return module.sample_z(n, args.latent_dim, device)
        return torch.randn(n, args.latent_dim, device=device)

    def real_shape(self, args):
        if getattr(args, "dataset", None) in ("8gaussians", "25gaussians", "swissroll"):
            return (2,)
        side = getattr(args, "image_size", 28)  # noise_morph's mnist nets have no size flags: 1 x 28 x 28
        return (getattr(args, "channels", 1), side, side)

    def project_optimizer(self, module, generator, critic, args, cuda):
        if self.module == "wgan_gp_64":
            return torch.optim.Adam(critic.parameters(), lr=args.lr, betas=tuple(args.betas), eps=1e-8, fused=cuda)
        if hasattr(module, "make_optimizers"):
            return module.make_optimizers(generator, critic, args)[1]
        return torch.optim.Adam(critic.parameters(), lr=args.lr, betas=(0.5, 0.9))

    def reference_optimizer(self, critic, args):  # same hyper-parameters, PyTorch's default implementation
        betas = tuple(args.betas) if self.module == "wgan_gp_64" else (0.5, 0.9)
        return torch.optim.Adam(critic.parameters(), lr=args.lr, betas=betas)


SPECS = {
    "wgan_gp_64": Spec("wgan_gp_64", (), ("--gp-lambda", "0"),
                       "--gp-lambda 0: no penalty pass (real+fake in one forward)", True, True, True),
    "wgan_mnist": Spec("wgan_mnist", ("--penalty", "gp"), ("--penalty", "gp", "--gp-lambda", "0"),
                       "--penalty gp --gp-lambda 0: no penalty pass", True, False, False),
    "noise_morph": Spec("noise_morph", (), ("--gp-lambda", "0"), "--gp-lambda 0: no penalty pass",
                        False, False, False),
}
SPECS["noise_morph_toy"] = SPECS["noise_morph"]


def load_script(name):
    try:
        module = importlib.import_module(name)
    except Exception as e:  # a script mid-edit by its owner: its tests report it, the bench skips it
        pytest.skip(f"{name}.py does not import ({type(e).__name__}: {e})")
    missing = [f for f in ("parse_args", "Generator", "Critic", "gradient_penalty", "critic_step")
               if not hasattr(module, f)]
    if missing:
        pytest.skip(f"{name}.py lacks {', '.join(missing)}")
    return module


@contextmanager
def cuda_flags(device, tf32, cudnn_benchmark):
    """The precision flags one case runs under, restored afterwards (the scripts' main() set them globally)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = True if tf32 else saved[1]
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


# ------------------------------------------------------------------------------------- the reference step
def reference_penalty(critic, real, fake):
    """WGAN-GP's penalty the way most public code writes it (fake may carry the generator's graph)."""
    n = real.shape[0]
    alpha = torch.rand(n, *[1] * (real.dim() - 1), device=real.device)
    x_hat = real + alpha * (fake - real)
    x_hat.requires_grad_(True)
    scores = critic(x_hat)
    grad = torch.autograd.grad(outputs=scores, inputs=x_hat, grad_outputs=torch.ones_like(scores),
                               create_graph=True, retain_graph=True)[0]
    return ((grad.reshape(n, -1).norm(2, dim=1) - 1) ** 2).mean()


def custom_step(spec, module, generator, critic, opt, real, args, no_grad_gen=False, passes=3, set_to_none=False):
    """The reference step (defaults) and its ablations, all with the script's math.

    passes=3: critic(real), critic(fake), critic(x_hat); 2: critic(real+fake) then critic(x_hat);
    1: critic(real+fake+x_hat), as wgan_gp_64 did before this suite measured it (groups keep the parts apart)."""
    n = real.shape[0]
    z = spec.noise(module, args, n, real.device)
    if no_grad_gen:
        with torch.no_grad():
            fake = generator(z)
    else:
        fake = generator(z)  # generator graph built, fake not detached: the gradient flows into G for nothing

    def scores(*parts):
        kwargs = {"groups": len(parts)} if spec.grouped_critic else {}
        return critic(torch.cat(parts), **kwargs).split(n) if len(parts) > 1 else (critic(parts[0]),)

    if passes == 3:
        (d_real,), (d_fake,) = scores(real), scores(fake)
        gp = reference_penalty(critic, real, fake)
    else:
        alpha = torch.rand(n, *[1] * (real.dim() - 1), device=real.device)
        x_hat = (real + alpha * (fake - real)).requires_grad_(True)
        if passes == 2:
            (d_real, d_fake), (d_hat,) = scores(real, fake), scores(x_hat)
        else:
            d_real, d_fake, d_hat = scores(real, fake, x_hat)
        (grad,) = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)
        gp = (grad.reshape(n, -1).norm(dim=1) - 1).square().mean()
    wasserstein = d_real.mean() - d_fake.mean()
    # a penalised step of a lazy penalty (--gp-every K) weighs it lambda * K, so its average weight stays lambda
    loss = -wasserstein + args.gp_lambda * getattr(args, "gp_every", 1) * gp
    if getattr(args, "drift", 0):
        loss = loss + args.drift * d_real.square().mean()
    opt.zero_grad(set_to_none=set_to_none)
    loss.backward()
    opt.step()
    return {"loss_critic": loss.detach(), "wasserstein": wasserstein.detach(), "gp": gp.detach()}


def assert_same_math(spec, module, args, generator, critic, real, ours=None):
    """The reference equals the script: penalty on the same inputs, then a whole step's losses and gradients
    (of the script's critic_step, or of `ours`, a step with critic_step's signature)."""
    ours = ours or module.critic_step
    device = real.device
    with cuda_flags(device, tf32=False, cudnn_benchmark=False):
        tol = 1e-4 if device.type == "cpu" else 1e-3
        net = copy.deepcopy(critic).eval()  # dropout off, so both sides see one network
        torch.manual_seed(123)
        with torch.no_grad():
            fake = generator(spec.noise(module, args, real.shape[0], device))
        torch.manual_seed(7)
        gp_script = module.gradient_penalty(net, real, fake)
        torch.manual_seed(7)
        gp_ref = reference_penalty(net, real, fake)
        torch.testing.assert_close(gp_script, gp_ref, rtol=tol, atol=1e-6,
                                   msg=lambda m: f"{spec.module}: gradient_penalty differs from the reference: {m}")
        critics = [copy.deepcopy(critic).eval() for _ in range(2)]
        opts = [torch.optim.Adam(c.parameters(), lr=1e-4) for c in critics]
        gens = [copy.deepcopy(generator) for _ in range(2)]
        torch.manual_seed(11)
        mine = ours(gens[0], critics[0], opts[0], real, args)
        torch.manual_seed(11)
        theirs = custom_step(spec, module, gens[1], critics[1], opts[1], real, args)
        for key in ("loss_critic", "wasserstein", "gp"):
            torch.testing.assert_close(mine[key].float(), theirs[key].float(), rtol=tol, atol=1e-6,
                                       msg=lambda m: f"{spec.module}: critic_step's {key} differs: {m}")
        for (name, a), b in zip(critics[0].named_parameters(), critics[1].parameters()):
            err = (a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)
            assert err < tol * 10, f"{spec.module}: critic gradient of {name} differs by {err:.2e} (relative)"


# --------------------------------------------------------------------------------------------- the cases
def setup_case(plan, config, size, variant):
    spec = SPECS[config]
    module = load_script(spec.module)
    size_argv, default_batch, large_batch = plan.sizes(config)
    batch = default_batch if size == "default" else large_batch
    nogp = variant == "nogp"
    argv = [*size_argv, *(spec.nogp_argv if nogp else spec.gp_argv), "--batch-size", str(batch), "--device", "cpu"]
    args = module.parse_args(argv)
    cuda = plan.device.type == "cuda"
    project = variant in ("gp", "nogp", "project+channels_last")
    layout = torch.channels_last if (
        (project and cuda and spec.channels_last) or variant == "project+channels_last") else torch.contiguous_format
    torch.manual_seed(0)
    generator = module.Generator(args).to(plan.device, memory_format=layout)
    critic = module.Critic(args).to(plan.device, memory_format=layout)
    opt = (spec.project_optimizer(module, generator, critic, args, cuda) if project
           else spec.reference_optimizer(critic, args))
    real = torch.rand(batch, *spec.real_shape(args), device=plan.device) * 2 - 1
    if layout == torch.channels_last and real.dim() == 4 and (spec.module == "wgan_gp_64" or not cuda):
        real = real.contiguous(memory_format=torch.channels_last)  # as wgan_gp_64's main hands it over
    return spec, module, argv, args, batch, generator, critic, opt, real


ABLATIONS = {  # bench-written steps: (no_grad_gen, passes, set_to_none)
    "ref+no_grad_G": (True, 3, False),
    "ref+no_grad_G+set_to_none": (True, 3, True),
    "two_pass(bench)": (True, 2, True),
    "one_pass(bench)": (True, 1, True),
}


def run_case(benchmark, plan, record_step, config, size, variant):
    spec, module, argv, args, batch, generator, critic, opt, real = setup_case(plan, config, size, variant)
    project = variant in ("gp", "nogp", "project+channels_last")
    if variant == "ref":
        assert_same_math(spec, module, args, generator, critic, real)
    elif variant in ABLATIONS:  # the bench-written variants must do the reference's math too
        assert_same_math(spec, module, args, generator, critic, real, ours=lambda g, c, o, r, a: custom_step(
            spec, module, g, c, o, r, a, *ABLATIONS[variant]))

    if project:
        def step():
            return module.critic_step(generator, critic, opt, real, args)
    else:
        flags = ABLATIONS.get(variant, (False, 3, False))

        def step():
            return custom_step(spec, module, generator, critic, opt, real, args, *flags)

    def timed():
        out = step()
        plan.sync()  # CUDA runs asynchronously: the round ends when the GPU is done
        return out

    benchmark.group = f"{config} batch {batch}"
    benchmark.extra_info.update(plan.extra_info(), script=f"{spec.module}.py", config=config, variant=variant,
                                batch=batch, dtype=str(real.dtype), image_size=list(real.shape[1:]),
                                argv=" ".join(argv))
    if variant == "nogp":
        benchmark.extra_info["note"] = spec.nogp_note
    with cuda_flags(plan.device, tf32=project, cudnn_benchmark=spec.cudnn_benchmark if project else False):
        out = benchmark.pedantic(timed, rounds=plan.rounds, warmup_rounds=plan.warmup_rounds,
                                 iterations=plan.iterations)
    assert torch.isfinite(out["loss_critic"]).item()
    record_step(benchmark, config, batch, variant)


CASES = [(c, s, v) for c in CONFIGS for s in ("default", "large") for v in ("gp", "nogp", "ref")]


@pytest.mark.parametrize("config,size,variant", CASES, ids=["-".join(c) for c in CASES])
def test_critic_step(benchmark, plan, record_step, config, size, variant):
    run_case(benchmark, plan, record_step, config, size, variant)


ABLATION_CASES = [(c, s, v) for c in CONFIGS for s in ("default", "large")
                  for v in (*ABLATIONS, "project+channels_last")
                  if not (v == "project+channels_last" and c == "noise_morph_toy")]


@pytest.mark.parametrize("config,size,variant", ABLATION_CASES, ids=["-".join(c) for c in ABLATION_CASES])
def test_critic_step_ablation(benchmark, plan, record_step, config, size, variant):
    if plan.quick and size != "default":
        pytest.skip("--bench-quick runs the ablations at the default batch only")
    if variant == "project+channels_last" and plan.device.type == "cuda":
        pytest.skip("on CUDA the project cases already use channels_last where the script does")
    run_case(benchmark, plan, record_step, config, size, variant)


@pytest.mark.parametrize("config", CONFIGS)
def test_reference_same_math(plan, config):
    """The reference step's math equals the script's (tiny sizes), even when benchmarks are skipped."""
    quick_plan = copy.copy(plan)
    quick_plan.quick = True
    spec, module, _, args, _, generator, critic, _, real = setup_case(quick_plan, config, "default", "ref")
    assert_same_math(spec, module, args, generator, critic, real)
