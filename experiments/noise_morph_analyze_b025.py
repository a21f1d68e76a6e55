import json, numpy as np, os
def stats(name):
    out = []
    for s in (1, 2, 3):
        p = f"runs/exp/exp_8gaussians_{name}_s{s}/metrics.jsonl"
        if not os.path.exists(p): continue
        r = [json.loads(l) for l in open(p)]
        if r[-1]["iter"] != 5000: continue
        out.append((r[-1]["modes_covered"], r[-1]["hq_share"], np.mean([x["modes_covered"] for x in r[-10:]]),
                    np.mean([x["hq_share"] for x in r[-10:]]), next((x["iter"] for x in r if x["modes_covered"] == 8), np.nan),
                    np.mean([x["morph_gap"] for x in r]) if r[-1]["morph_gap"] is not None else np.nan, r[-1]["seconds"]))
    a = np.array(out, float)
    print(name, f"n={len(a)}", "[modes@5000, hq@5000, modes 4100-5000, hq 4100-5000, first all-8, mean gap, seconds]")
    print("  per seed", np.round(a, 3).tolist())
    print("  mean", np.round(a.mean(0), 3).tolist(), "std", np.round(a.std(0, ddof=1), 3).tolist() if len(a) > 1 else "")
for n in ("morph", "morphb025", "nomorph"): stats(n)
