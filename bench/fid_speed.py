"""How fast FID features come on this machine: torch-fidelity's own defaults against the scripts' path.

Arms, each on the same n MNIST-sized uint8 images (28x28, repeated to 3 channels; Inception resizes every input
to 299x299, so the input size hardly matters), interleaved round by round so that they share the load:
  defaults      torch_fidelity.calculate_metrics as a user calls it (its DataLoader starts min(4, 2 x cores)
                worker processes, batch 64)
  no workers    the same call with save_cpu_ram=True (no worker processes), batch 100: the scripts' old path
  ours b25 cl   the scripts' path: torch-fidelity's extractor in channels_last, batches of 25, no loader
  ours b100     the same extractor without channels_last, batches of 100 (what channels_last and batch buy)
Threads: torch's default here (all cores) unless OMP_NUM_THREADS says otherwise.

    .venv/bin/python bench/fid_speed.py --n 200 --rounds 2 \
        --weights ../shared/models/weights-inception-2015-12-05-6726825d.pth
"""
import argparse
import time

import torch


class Items(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="images per arm and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--weights", required=True, help="torch-fidelity Inception weights")
    args = p.parse_args()
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    images = torch.randint(0, 256, (args.n, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).expand(-1, 3, -1, -1).contiguous()
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=args.weights)
    net.eval()

    def fidelity(**kw):
        torch_fidelity.calculate_metrics(input1=Items(images), input2=Items(images), fid=True, cuda=False,
                                         feature_extractor_weights_path=args.weights, verbose=False, cache=False,
                                         **kw)

    @torch.no_grad()
    def ours(batch, channels_last):
        m = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for _ in range(2):  # both sides, as calculate_metrics does
            for chunk in images.split(batch):
                m(chunk)

    arms = {"defaults": lambda: fidelity(),
            "no workers, b100": lambda: fidelity(save_cpu_ram=True, batch_size=100),
            "ours b25 cl": lambda: ours(25, True),
            "ours b100": lambda: ours(100, False)}
    seconds = {name: [] for name in arms}
    ours(25, True)  # warm-up
    for _ in range(args.rounds):
        for name, run in arms.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    print(f"{torch.get_num_threads()} thread(s), n = {args.n} per side, {args.rounds} interleaved rounds")
    for name, s in seconds.items():
        print(f"{name:<18} {2 * args.n / min(s):6.1f} images/s (best round), {2 * args.n / (sum(s) / len(s)):6.1f} mean")


if __name__ == "__main__":
    main()
