import pytest
import torch

from llmcomp.formats import Uniform
from llmcomp.quant.decoupleq import DecoupleQConfig, DecoupleQQuantizer, dequant, objective, solve_floats
from llmcomp.quant.gptq import GPTQConfig, GPTQQuantizer, static_grid
from llmcomp.quant.hessian import HessianAccumulator


def correlated_layer(out_f=24, in_f=80, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(tokens, in_f, generator=g) @ mix + 0.1 * torch.randn(tokens, in_f, generator=g)
    X[:, :3] *= 8  # a few large-magnitude input channels, as in LLMs
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = torch.randn(out_f, in_f, generator=g)
    acc = HessianAccumulator.for_linear(lin)
    acc.add(X)
    return lin, acc, X


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_float_step_is_the_least_squares_optimum(sym):
    fmt = Uniform(bits=3, group_size=16, symmetric=sym)
    lin, acc, _ = correlated_layer(out_f=4, in_f=48)
    W, H = lin.weight.data, acc.finalize(0.01).H
    scale, zero = static_grid(W, fmt)
    codes = fmt.encode(W, fmt.expand(scale, 48), fmt.expand(zero, 48))
    s2, z2 = solve_floats(W, codes, H, fmt, scale, zero)
    before = objective(W, dequant(codes, scale, zero, fmt, 48), H)
    after = objective(W, dequant(codes, s2, z2, fmt, 48), H)
    assert after <= before * (1 + 1e-3)
    # Brute force: the float parameters minimise the H-weighted error, row by row.
    L = torch.linalg.cholesky(H.double())
    for r in range(4):
        q = codes[r].double() - (2 ** (fmt.bits - 1) if sym else 0)
        cols = [torch.where(torch.arange(48) // 16 == a, q, 0.0) for a in range(3)]
        if not sym:
            cols += [torch.where(torch.arange(48) // 16 == a, 1.0, 0.0).double() for a in range(3)]
        A = torch.stack(cols, 1)
        theta = torch.linalg.lstsq(L.T @ A, L.T @ W[r].double()).solution
        best = float(((A @ theta - W[r].double()) @ H.double() @ (A @ theta - W[r].double())))
        mine = dequant(codes[r:r + 1], s2[r:r + 1], z2[r:r + 1], fmt, 48)[0].double()
        got = float((mine - W[r].double()) @ H.double() @ (mine - W[r].double()))
        assert got <= best * (1 + 2e-3) + 1e-9


@pytest.mark.parametrize("group", [0, 32], ids=["per-channel", "g32"])
def test_decoupleq_not_worse_than_gptq_and_trace_recorded(group):
    fmt = Uniform(bits=2, group_size=group)
    lin, acc, X = correlated_layer()
    res_g = GPTQQuantizer(GPTQConfig(format=fmt)).quantize_linear("l", lin, acc)
    lin2, acc2, _ = correlated_layer()
    res_d = DecoupleQQuantizer(DecoupleQConfig(format=fmt, rounds=3)).quantize_linear("l", lin2, acc2)
    err = lambda m: float((X @ (lin.weight.data - m.dequantize()).T).pow(2).sum())  # noqa: E731
    assert err(res_d.module) < err(res_g.module)
    trace = res_d.metrics["objective_trace_rel"]
    assert len(trace) == 6
    # out_err_rel: of the stored weights on the calibration inputs, as GPTQ's (it was the dampened objective's)
    ref = float((X @ lin.weight.data.T).pow(2).sum())
    for res in (res_d, res_g):
        assert res.metrics["out_err_rel"] == pytest.approx(err(res.module) / ref, rel=1e-3)
    # each float step (odd entries) never increases the objective of the integer step before it
    assert all(trace[i + 1] <= trace[i] * (1 + 1e-3) for i in range(0, 6, 2))


def test_decoupleq_end_to_end_tiny_model(tiny_model_dir, tmp_path):
    import llmcomp
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.quant import quantize_model

    model = llmcomp.load(str(tiny_model_dir))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    report = quantize_model(model, DecoupleQConfig(format=Uniform(bits=2, group_size=32), rounds=2), ids,
                            device="cpu")
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert all("objective_trace_rel" in v for k, v in report.items() if not k.startswith("_"))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_zero_row_keeps_its_grid_instead_of_crashing():
    """A zero row (or dead inputs) made the symmetric float step's system all zeros; its 1e-30 ridge was flushed
    to zero with the denormals, and the solve raised a singular-matrix traceback."""
    fmt = Uniform(bits=3, group_size=16, symmetric=True)
    lin, acc, _ = correlated_layer(out_f=8, in_f=48)
    lin.weight.data[5] = 0
    res = DecoupleQQuantizer(DecoupleQConfig(format=fmt, rounds=2)).quantize_linear("l", lin, acc)
    assert torch.isfinite(res.module.dequantize()).all()
    assert res.module.dequantize()[5].abs().max() == 0


def test_a_raised_dampening_reaches_the_float_step():
    """With --damp 0 and fewer tokens than inputs the Hessian is singular: the factorization raised the dampening
    but the float step kept the singular H, and its least squares made the objective ~100x worse."""
    import warnings

    lin, acc, _ = correlated_layer(out_f=16, in_f=128, tokens=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = DecoupleQQuantizer(DecoupleQConfig(format=Uniform(bits=3, group_size=32), damp=0.0, rounds=3)
                                 ).quantize_linear("l", lin, acc)
    trace = res.metrics["objective_trace_rel"]
    assert res.metrics["damp"] > 0 and max(trace) < 2 * trace[0], trace


@pytest.mark.parametrize("damp", [-0.5, 1e9])
def test_damp_out_of_range_refused_before_any_work(damp):
    from llmcomp.errors import UserError
    from llmcomp.quant.allocate import AllocationConfig

    with pytest.raises(UserError, match="dampening"):
        DecoupleQConfig(format=Uniform(bits=3, group_size=16), damp=damp)
    with pytest.raises(UserError, match="dampening"):
        AllocationConfig(budget=3.5, damp=damp)
