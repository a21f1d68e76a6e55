"""Aggregate runs/exp: final and last-1000-step metrics, mean and std over seeds; gap curves; contour panels."""
import json, sys, os
import numpy as np
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
root = "runs/exp"
def load(ds, mode, s):
    p = f"{root}/exp_{ds}_{mode}_s{s}/metrics.jsonl"
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else None
for ds, K in (("8gaussians", 8), ("25gaussians", 25)):
    runs = {m: {s: load(ds, m, s) for s in (1, 2, 3)} for m in ("morph", "nomorph")}
    print(f"== {ds}")
    for m, rs in runs.items():
        rs = {s: r for s, r in rs.items() if r and r[-1]["iter"] == 5000}
        if not rs: continue
        def stat(f):
            v = np.array([f(r) for r in rs.values()], float); return f"{v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:.3f}  {np.round(v, 3).tolist()}"
        last10 = lambda r, k: np.mean([x[k] for x in r[-10:]])
        first_all = lambda r: next((x["iter"] for x in r if x["modes_covered"] == K), np.nan)
        print(f"{m:8s} n={len(rs)} seeds={sorted(rs)}")
        print(f"   modes@5000      {stat(lambda r: r[-1]['modes_covered'])}")
        print(f"   hq@5000         {stat(lambda r: r[-1]['hq_share'])}")
        print(f"   modes 4100-5000 {stat(lambda r: last10(r, 'modes_covered'))}")
        print(f"   hq 4100-5000    {stat(lambda r: last10(r, 'hq_share'))}")
        print(f"   first iter all {K} modes {stat(first_all)}")
        print(f"   W@5000          {stat(lambda r: r[-1]['wasserstein'])}")
        print(f"   d_gz@5000       {stat(lambda r: r[-1]['d_gz'])}")
        print(f"   sec total       {stat(lambda r: r[-1]['seconds'])}")
        if m == "morph":
            for it in (500, 1000, 2500, 5000):
                print(f"   gap@{it:<5d}      {stat(lambda r: next(x['morph_gap'] for x in r if x['iter'] == it))}")
            print(f"   gap mean over all logs {stat(lambda r: np.mean([x['morph_gap'] for x in r]))}")
    ok = {m: [r for r in rs.values() if r] for m, rs in runs.items()}
    if ok["morph"]:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for r in ok["morph"]:
            it = [x["iter"] for x in r]
            axes[0].plot(it, [x["morph_gap"] for x in r], alpha=0.7)
        axes[0].axhline(0, color="k", lw=0.5); axes[0].set(title=f"{ds}: D(G(z)) - D(G(NM(z))), morph runs (one line per seed)", xlabel="generator step")
        for m, c in (("morph", "C0"), ("nomorph", "C1")):
            for i, r in enumerate(ok[m]):
                it = [x["iter"] for x in r]
                axes[1].plot(it, [x["modes_covered"] for x in r], c=c, alpha=0.6, label=m if i == 0 else None)
                axes[2].plot(it, [x["hq_share"] for x in r], c=c, alpha=0.6, label=m if i == 0 else None)
        axes[1].set(title="modes covered", xlabel="generator step"); axes[2].set(title="high-quality share", xlabel="generator step")
        axes[1].legend(); axes[2].legend(); fig.tight_layout(); fig.savefig(f"{root}/curves_{ds}.png", dpi=80); plt.close(fig)
    for fig_name, src in (("contours", "critic_contour.png"), ("latents", "latent.png")):
      imgs = [[f"{root}/exp_{ds}_{m}_s{s}/{src}" for s in (1, 2, 3)] for m in ("morph", "nomorph")]
      if all(os.path.exists(p) for row in imgs for p in row):
        fig, axes = plt.subplots(2, 3, figsize=(15, 10) if src.startswith("critic") else (24, 7))
        for i, row in enumerate(imgs):  # noqa
            for j, p in enumerate(row):
                axes[i, j].imshow(plt.imread(p)); axes[i, j].axis("off"); axes[i, j].set_title(("morph", "no-morph")[i] + f" seed {j+1}")
        fig.tight_layout(); fig.savefig(f"{root}/{fig_name}_{ds}.png", dpi=80); plt.close(fig)
