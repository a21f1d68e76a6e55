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
    channels_last: bool  # what main() does on CUDA (every script's main also turns TF32 on there)
    cudnn_benchmark: bool
    fused: bool  # fused Adam kernels
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
        """The critic's optimizer as the script's build_nets makes it on a CUDA (cuda=True) or CPU device."""
        fused = (cuda and self.fused) or None
        if self.module == "wgan_gp_64":
            return torch.optim.Adam(critic.parameters(), lr=args.lr, betas=tuple(args.betas), eps=1e-8, fused=fused)
        if hasattr(module, "make_optimizers"):
            return module.make_optimizers(generator, critic, args, fused=bool(fused))[1]
        return torch.optim.Adam(critic.parameters(), lr=args.lr, betas=(0.5, 0.9), fused=fused)

    def main_layout(self, cuda):
        return torch.channels_last if cuda and self.channels_last else torch.contiguous_format

    def main_real(self, real, cuda):
        """The batch as main() hands it to critic_step: wgan_gp_64 moves it in the nets' layout."""
        if self.module == "wgan_gp_64" and real.dim() == 4:
            return real.contiguous(memory_format=self.main_layout(cuda))
        return real

    def reference_optimizer(self, critic, args):  # same hyper-parameters, PyTorch's default implementation
        betas = tuple(args.betas) if self.module == "wgan_gp_64" else (0.5, 0.9)
        return torch.optim.Adam(critic.parameters(), lr=args.lr, betas=betas)


SPECS = {
    "wgan_gp_64": Spec("wgan_gp_64", (), ("--gp-lambda", "0"),
                       "--gp-lambda 0: no penalty pass (real+fake in one forward)", True, True, True, True),
    "wgan_mnist": Spec("wgan_mnist", ("--penalty", "gp"), ("--penalty", "gp", "--gp-lambda", "0"),
                       "--penalty gp --gp-lambda 0: no penalty pass", True, False, True, False),
    "noise_morph": Spec("noise_morph", (), ("--gp-lambda", "0"), "--gp-lambda 0: no penalty pass",
                        False, False, False, False),
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
def cuda_flags(tf32, cudnn_benchmark):
    """The precision flags one case runs under, TF32 for matmuls and cuDNN convolutions alike, restored
    afterwards (the scripts' main() set them globally; a CPU ignores them)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
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
    with cuda_flags(tf32=False, cudnn_benchmark=False):
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
    layout = torch.channels_last if variant == "project+channels_last" else (
        spec.main_layout(cuda) if project else torch.contiguous_format)
    torch.manual_seed(0)
    generator = module.Generator(args).to(plan.device, memory_format=layout)
    critic = module.Critic(args).to(plan.device, memory_format=layout)
    opt = (spec.project_optimizer(module, generator, critic, args, cuda) if project
           else spec.reference_optimizer(critic, args))
    real = torch.rand(batch, *spec.real_shape(args), device=plan.device) * 2 - 1
    if variant == "project+channels_last" and real.dim() == 4:
        real = real.contiguous(memory_format=torch.channels_last)
    elif project:
        real = spec.main_real(real, cuda)
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
    with cuda_flags(tf32=project, cudnn_benchmark=spec.cudnn_benchmark if project else False):
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


def assert_main_setup_math(spec, module, args, generator, critic, real, cuda):
    """The script's critic_step as main() sets it up on CUDA (its layout, its optimizer with fused Adam where
    main uses it, TF32 and cudnn.benchmark as main sets them) equals the reference step in strict float32:
    losses, critic gradients and the optimizer's update. On a CPU the same layout and fused Adam run (TF32 is
    CUDA's), so CI checks that set-up's math; on CUDA the tolerance is TF32's."""
    tol = 2e-2 if cuda else 1e-4
    layout = spec.main_layout(True)
    nets = {}
    for side in ("main", "ref"):
        c = copy.deepcopy(critic).eval()  # dropout off, so both sides see one network
        g = copy.deepcopy(generator)
        if side == "main":
            c, g = c.to(memory_format=layout), g.to(memory_format=layout)
            opt = spec.project_optimizer(module, g, c, args, cuda=True)
        else:
            opt = spec.reference_optimizer(c, args)
        nets[side] = (g, c, opt, [p.detach().clone() for p in c.parameters()])
    torch.manual_seed(11)
    with cuda_flags(tf32=True, cudnn_benchmark=spec.cudnn_benchmark):
        g, c, opt, _ = nets["main"]
        mine = module.critic_step(g, c, opt, spec.main_real(real.clone(), True), args)
    torch.manual_seed(11)
    with cuda_flags(tf32=False, cudnn_benchmark=False):
        g, c, opt, _ = nets["ref"]
        theirs = custom_step(spec, module, g, c, opt, real.clone(), args)
    for key in ("loss_critic", "wasserstein", "gp"):
        torch.testing.assert_close(mine[key].float(), theirs[key].float(), rtol=tol, atol=1e-5,
                                   msg=lambda m: f"{spec.module} as main() sets it up: {key} differs: {m}")
    (_, c_main, _, before), (_, c_ref, _, _) = nets["main"], nets["ref"]
    for (name, a), b, p0 in zip(c_main.named_parameters(), c_ref.parameters(), before):
        err = (a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)
        assert err < tol * 10, f"{spec.module} as main() sets it up: gradient of {name} differs by {err:.2e}"
        step_a, step_b = a.detach() - p0, b.detach() - p0
        err = (step_a - step_b).norm() / step_b.norm().clamp_min(1e-12)
        assert err < tol * 10, f"{spec.module} as main() sets it up: the update of {name} differs by {err:.2e}"


@pytest.mark.parametrize("config", CONFIGS)
def test_main_setup_same_math(plan, config):
    """main()'s CUDA set-up (channels_last, fused Adam, TF32, cudnn.benchmark) computes the reference's step."""
    quick_plan = copy.copy(plan)
    quick_plan.quick = True
    spec, module, _, args, _, generator, critic, _, real = setup_case(quick_plan, config, "default", "ref")
    assert_main_setup_math(spec, module, args, generator, critic, real, plan.device.type == "cuda")


@pytest.mark.parametrize("config", ("wgan_gp_64", "wgan_mnist", "noise_morph"))
def test_project_optimizer_is_mains(config):
    """The bench's critic optimizer is the one the script's build_nets makes: on a CPU the same class and
    hyper-parameters, and on CUDA fused exactly where main() passes fused=True (its build_nets on CUDA)."""
    spec = SPECS[config]
    module = load_script(spec.module)
    args = module.parse_args([*spec.gp_argv, "--device", "cpu"])
    nets = module.build_nets(args, torch.device("cpu"))
    script = next(getattr(nets, k) for k in ("opt_d", "opt_c", "opt_critic") if hasattr(nets, k))
    for cuda in (False, True):
        ours = spec.project_optimizer(module, nets.generator, nets.critic, args, cuda)
        assert type(ours) is type(script)
        expected = {**script.defaults, "fused": (cuda and spec.fused) or None}
        assert {**ours.defaults, "fused": ours.defaults.get("fused") or None} == expected, (config, cuda)


def test_cuda_flags_turn_tf32_off_for_matmuls_and_convolutions():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    for tf32, bench in ((False, False), (True, True)):
        with cuda_flags(tf32=tf32, cudnn_benchmark=bench):
            assert torch.backends.cuda.matmul.allow_tf32 is tf32
            assert torch.backends.cudnn.allow_tf32 is tf32
            assert torch.backends.cudnn.benchmark is bench
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == saved
