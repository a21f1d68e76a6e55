"""The penalty's double backward through one conv in bf16 against float64, on this machine's CPU: cosine and norm
ratio of the weight gradient of ||dy/dx||^2, per conv shape, with oneDNN on and off.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bf16_double_backward.py
"""
import torch
import torch.nn.functional as F


def weight_grad_of_penalty(dtype, k, stride, pad):
    torch.manual_seed(0)
    w = (torch.randn(8, 3, k, k) * 0.1).to(dtype).requires_grad_(True)
    x = torch.rand(4, 3, 16, 16).to(dtype).requires_grad_(True)
    y = F.leaky_relu(F.conv2d(x, w, stride=stride, padding=pad), 0.2)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (g,) = torch.autograd.grad((y * v).float().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(g.float().square().sum(), w)
    return gw.double().flatten()


print(f"torch {torch.__version__}, oneDNN bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
print("oneDNN  kernel stride pad   cosine  norm ratio (bf16 / float64)")
for onednn in (True, False):
    torch.backends.mkldnn.enabled = onednn
    for k, stride, pad in ((5, 1, 2), (3, 1, 1), (4, 1, 2), (5, 1, 0), (4, 2, 1), (1, 1, 0)):
        ref, bf16 = weight_grad_of_penalty(torch.float64, k, stride, pad), weight_grad_of_penalty(torch.bfloat16, k, stride, pad)
        print(f"{'on' if onednn else 'off':6s}  {k:6d} {stride:6d} {pad:3d}  {F.cosine_similarity(ref, bf16, dim=0).item():7.4f}"
              f"  {(bf16.norm() / ref.norm()).item():7.3f}")
