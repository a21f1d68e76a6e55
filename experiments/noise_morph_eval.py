"""Post-hoc on each final checkpoint: toy metrics of G(z) and G(NM(z)) (morph runs) on the run's fixed z, and the
spread of D(G(z)) over a 61x61 grid of the latent square (the seed's 'smoothing' claim): std and max - min."""
import sys, argparse, numpy as np, torch
import noise_morph as nm
side = torch.linspace(-1, 1, 61)
grid = torch.stack(torch.meshgrid(side, side, indexing="xy"), -1).reshape(-1, 2)
for ds in sys.argv[1:]:
    for mode in ("morph", "nomorph"):
        rows = []
        for s in (1, 2, 3):
            try:
                ck = torch.load(f"runs/exp/exp_{ds}_{mode}_s{s}/ckpt/last.pt", weights_only=False)
            except FileNotFoundError:
                continue
            if ck["iter"] != 5000:
                continue
            args = argparse.Namespace(**ck["args"])
            g, d, m = nm.Generator(args), nm.Critic(args), nm.NoiseMorpher(args)
            for mod, (st, _) in zip((g, d, m), ck["models"]):
                mod.load_state_dict(st)
            z = nm.sample_z(args.eval_samples, args.latent_dim, "cpu", torch.Generator().manual_seed(args.seed + 1))
            with torch.no_grad():
                b = nm.toy_metrics(ds, g(m(z))) if mode == "morph" else {"modes_covered": np.nan, "hq_share": np.nan}
                moved = (m(z) - z).norm(dim=1).mean().item() if mode == "morph" else np.nan
                v = d(g(grid))
            rows.append((b["modes_covered"], b["hq_share"], moved, v.std().item(), (v.max() - v.min()).item()))
        r = np.array(rows, float)
        if len(r):
            print(ds, mode, f"n={len(r)}", "[modes G(NM(z)), hq G(NM(z)), mean |NM(z)-z|, std D(G(grid)), range D(G(grid))]")
            print("   per seed", np.round(r, 3).tolist())
            print("   mean", np.round(r.mean(0), 3).tolist(), "std", np.round(r.std(0, ddof=1), 3).tolist() if len(r) > 1 else "")
