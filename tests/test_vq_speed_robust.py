"""Issue 6: PVQ's greedy projection (pulse loop on the host) gives exactly the old all-torch result, and
k-means' stratified sample keeps a layer's few heavy points (VPTQ codebooks stopped depending on the
seed's luck)."""
import pytest
import torch

from llmcomp.formats.pyramid import project
from llmcomp.quant.kmeans import _stratified_sample, assign, cluster_sums, kmeans


def project_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The former all-torch greedy loop, kept as the specification."""
    G, N = x.shape
    ax = x.float().abs()
    l1 = ax.sum(1, keepdim=True)
    empty = ~(l1[:, 0] > 0)
    ax = ax.clone()
    ax[empty] = 0.0
    ax[empty, 0] = 1.0
    l1 = ax.sum(1, keepdim=True)
    y = torch.floor(k * ax / l1).clamp(max=k)
    y[y.sum(1) > k] = 0
    rem, xy, yy = k - y.sum(1), (ax * y).sum(1), (y * y).sum(1)
    rows = torch.arange(G)
    for _ in range(int(rem.max()) if G else 0):
        active = (rem > 0).float()
        i = ((xy[:, None] + ax) ** 2 / (yy[:, None] + 2 * y + 1)).argmax(1)
        yi = y[rows, i]
        y[rows, i] = yi + active
        xy, yy, rem = xy + active * ax[rows, i], yy + active * (2 * yi + 1), rem - active
    return (y * torch.where(x < 0, -1.0, 1.0)).to(torch.int16)


@pytest.mark.parametrize("n", [4, 16, 64, 128])
def test_project_matches_the_torch_loop(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(700, n, generator=g) * torch.rand(700, 1, generator=g) ** 3
    x[0] = 0  # zero row
    x[1, 1:] = 0
    x[2] = 1e-30
    x[3] *= 1e20  # scores overflow to inf
    x[4, 1] = float("nan")  # non-finite row: all pulses on the first entry
    x[5] = torch.tensor([1.0, -1.0] * (n // 2))  # ties: first index wins
    x[6] = torch.randint(-3, 4, (n,), generator=g).float()  # many exact ties
    for k in (1, 2, 7, 38, 87, 300):
        got = project(x, k)
        assert got.dtype == torch.int16 and bool((got.abs().sum(1) == k).all())
        assert torch.equal(got, project_reference(x, k)), k
    assert project(x[:0], 5).shape == (0, n)


def heavy_data(seed=0):
    """20000 light points around 0 and 10 heavy ones (weight 1e4) at (5, 5): the heavy ones carry
    ~83 % of the weighted objective."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20000, 2, generator=g)
    h = torch.ones_like(x)
    x[:10] = 5 + 0.01 * torch.randn(10, 2, generator=g)
    h[:10] = 1e4
    return x, h


def test_stratified_sample_keeps_heavy_points_and_total_weight():
    x, h = heavy_data()
    for seed in range(5):
        xs, hs = _stratified_sample(x, h, 2000, torch.Generator().manual_seed(seed))
        assert xs.shape == (2000, 2)
        assert int((hs[:, 0] >= 1e4).sum()) == 10  # every heavy point, once
        assert abs(float(hs.sum() / h.sum()) - 1) < 0.01  # the light rest reweighted by its draw rate
    c = kmeans(x, None, 4, iters=2, sample=1)  # a sample smaller than the codebook: raised to it
    assert c.shape == (4, 2) and bool(c.isfinite().all())


def test_kmeans_on_a_sample_serves_heavy_points_for_every_seed():
    """A uniform 10 % draw misses all 10 heavy points about a third of the time (0.9¹⁰), and then no
    entry sits near them; the stratified sample always fits an entry there."""
    x, h = heavy_data()
    for seed in range(6):
        c = kmeans(x, h, 8, iters=10, sample=2000, seed=seed)
        near = c[assign(x[:10], h[:10], c)]
        assert float((near - x[:10]).norm(dim=1).max()) < 0.1, seed


@pytest.mark.cuda
def test_project_on_cuda_matches_the_torch_loop_on_cuda():
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(3)).cuda()
    x[0] = 0
    for k in (7, 38, 87):
        assert torch.equal(project(x, k).cpu(), project_reference(x, k).cpu()), k


@pytest.mark.cuda
def test_pvq_layer_on_cuda_is_unchanged(monkeypatch):
    """A whole PVQ + Hadamard layer on the GPU: the host pulse loop gives the packed tensors the
    all-device loop gave."""
    from torch import nn

    import llmcomp.quant.pvq as pvq
    from llmcomp.quant.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 128, bias=False).cuda()
    lin.weight.data = (torch.randn(128, 256, generator=g) * 0.02).cuda()
    acc = HessianAccumulator(256)
    acc.add(torch.randn(512, 256, generator=g).cuda())
    cfg = pvq.PVQConfig(format=pvq.pyramid_for_bits(2, rotate=True), host_solve=False)
    new = pvq.PVQQuantizer(cfg).quantize_linear("l", lin, acc).module.state_dict()
    monkeypatch.setattr(pvq, "project", project_reference)
    old = pvq.PVQQuantizer(cfg).quantize_linear("l", lin, acc).module.state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


@pytest.mark.cuda
def test_pvq_host_solve_matches_the_gpu_solve():
    """PVQ on a GPU runs its column loop on the CPU by default: the layer comes back on the GPU with the
    same output error as the all-GPU solve (float sums differ, so codes may; the error must not, within 5 %)."""
    from torch import nn

    import llmcomp.quant.pvq as pvq
    from llmcomp.quant.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(256, 128, bias=False).cuda()
    lin.weight.data = (torch.randn(128, 256, generator=g) * 0.02).cuda()
    acc = HessianAccumulator(256)
    acc.add(torch.randn(512, 256, generator=g).cuda())
    fmt = pvq.pyramid_for_bits(2, rotate=True)
    host = pvq.PVQQuantizer(pvq.PVQConfig(format=fmt)).quantize_linear("l", lin, acc)
    gpu = pvq.PVQQuantizer(pvq.PVQConfig(format=fmt, host_solve=False)).quantize_linear("l", lin, acc)
    assert all(t.is_cuda for t in host.module.state_dict().values())
    e_host, e_gpu = host.metrics["out_err_rel"], gpu.metrics["out_err_rel"]
    assert abs(e_host - e_gpu) <= 0.05 * e_gpu, (e_host, e_gpu)


def test_cluster_sums_in_fixed_chunks_equal_index_add():
    """The CUDA path of k-means' centroid sums (one-hot float64 matmuls over fixed chunks; index_add_ there is
    atomic and unordered) equals the CPU's sequential index_add_, and the whole fit is the same on both paths."""
    g = torch.Generator().manual_seed(0)
    for k in (3, 256, 5000):  # 5000: chunks of fewer points than the 3000 below
        idx = torch.randint(0, k, (3000,), generator=g)
        v = torch.randn(3000, 8, generator=g)
        ref = torch.zeros(k, 8, dtype=torch.float64).index_add_(0, idx, v.double())
        got = cluster_sums(idx, v, k, chunked=True)
        assert got.dtype == v.dtype and torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(cluster_sums(idx, v, k, chunked=False), torch.zeros(k, 8).index_add_(0, idx, v))


@pytest.mark.cuda
def test_kmeans_is_the_same_on_every_cuda_run():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(20000, 4, generator=g) * torch.tensor([1.0, 3.0, 0.1, 1.0])).cuda()
    h = torch.rand(20000, 4, generator=g).cuda()
    a, b = kmeans(x, h, 256, iters=8), kmeans(x, h, 256, iters=8)
    assert torch.equal(a, b)
