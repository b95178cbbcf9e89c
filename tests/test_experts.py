"""MoE expert pruning: surgery == masked routing, artifact round trips, super-expert guard, bad input."""
from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.core.artifact import load_artifact, write_artifact
from llmcomp.core.config import to_dict
from llmcomp.errors import UserError
from llmcomp.prune import experts, mcmoe, moe
from llmcomp.prune.experts import ExpertPruneConfig

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
              max_position_embeddings=128, num_experts_per_tok=2, eos_token_id=1, bos_token_id=0, pad_token_id=1)
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_moe(family: str, seed: int = 0):
    """A tiny random MoE causal LM: 2 layers, 8 experts of 16 neurons, top-2."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=8)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                                norm_topk_prob=True)
    else:
        cfg = tf.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    for b in moe.find_moe_blocks(model):  # random init leaves routers at zero in some families
        torch.nn.init.normal_(b.router.weight, std=0.5)
    return model


def ids(n=4, t=24, seed=1):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def masked_routers(model, removed: dict[str, list[int]]):
    """Force the router logits of ``removed`` experts to −inf (the reference for surgery)."""
    linear = torch.nn.functional.linear
    rows = {id(b.router.weight): removed[b.path] for b in moe.find_moe_blocks(model) if b.path in removed}

    def patched(x, w, bias=None):
        out = linear(x, w, bias)
        if id(w) in rows:
            out = out.clone()
            out[..., rows[id(w)]] = float("-inf")
        return out

    with mock.patch("torch.nn.functional.linear", patched):
        yield


def routing(model, x):
    """Every block's chosen experts, as original expert ids (so a sliced model can be compared)."""
    seen = {}
    hooks = [b.router.register_forward_hook(lambda m, i, o, p=b.path: seen.__setitem__(p, o[2]))
             for b in moe.find_moe_blocks(model)]
    with torch.no_grad():
        logits = model(x).logits
    for h in hooks:
        h.remove()
    return logits, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_experts_equals_masking_their_router_logits(family):
    model = tiny_moe(family)
    removed = {"model.layers.0.mlp": [1, 5], "model.layers.1.mlp": [0, 6, 7]}  # per-layer counts differ
    x = ids()
    with masked_routers(model, removed):
        ref, ref_routes = routing(model, x)
    for b in moe.find_moe_blocks(model):
        moe.keep_experts(b, [e for e in range(8) if e not in removed[b.path]])
    got, routes = routing(model, x)
    for path, chosen in routes.items():
        kept = torch.tensor([e for e in range(8) if e not in removed[path]])
        assert torch.equal(kept[chosen], ref_routes[path])  # the same experts, exactly
    # Softmax denominators sum 8 terms (two of them 0) vs 6: float32 rounding only.
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert [b.num_experts for b in moe.find_moe_blocks(model)] == [6, 5]


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_experts_compute_the_same_block(family):
    model = tiny_moe(family)
    with torch.no_grad():
        ref = model(ids()).logits
        for b in moe.find_moe_blocks(model):
            moe.unfuse(b)
            assert b.unfused and b.sizes == [16] * 8
        torch.testing.assert_close(model(ids()).logits, ref, atol=1e-5, rtol=1e-5)


def _pruned(family, cfg, seed=0):
    model = tiny_moe(family, seed)
    stats = experts.collect_stats(model, ids(8, 32), cfg, device="cpu")
    report = experts.prune(model, stats, cfg)
    return model, report


def _save(model, report, cfg, path):
    stage = {"method": f"experts-{cfg.method}", "kind": moe.KIND, "config": to_dict(cfg), "shapes": moe.shapes(model),
             "metrics": report}
    return write_artifact(path, model, None, base_model={"name": "tiny"}, stages=[stage])


@pytest.mark.parametrize("family,method", [("mixtral", "reap"), ("qwen2_moe", "reconstruct"),
                                           ("olmoe", "frequency"), ("qwen3_moe", "random")])
def test_uniform_pruning_round_trips_and_loads_with_stock_transformers(family, method, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ExpertPruneConfig(method=method, ratio=0.25, protect_super_experts=False)
    model, report = _pruned(family, cfg)
    assert report["stock_loadable"] and all(len(r["removed"]) == 2 for r in report["layers"].values())
    path = _save(model, report, cfg, tmp_path / "a")
    with torch.no_grad():
        ref = model(ids()).logits
        assert torch.equal(load_artifact(path)[0](ids()).logits, ref)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(path).eval()(ids()).logits, ref)


def test_per_layer_counts_are_honoured_and_reloaded(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ExpertPruneConfig(method="reap", ratio=0.25, layer_ratios={"1": 0.5}, protect_super_experts=False)
    model, report = _pruned("mixtral", cfg)
    assert [b.num_experts for b in moe.find_moe_blocks(model)] == [6, 4] and not report["stock_loadable"]
    path = _save(model, report, cfg, tmp_path / "a")
    loaded = api.load(str(path))
    assert [b.num_experts for b in moe.find_moe_blocks(loaded)] == [6, 4]
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    with pytest.raises(Exception):  # the config still says 8 experts: stock loading must not pretend
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("compensate", [True, False])
def test_heapr_shrinks_experts_ragged_and_round_trips(compensate, tmp_path):
    cfg = ExpertPruneConfig(method="heapr", ratio=0.25, protect_super_experts=False, compensate=compensate)
    model, report = _pruned("qwen2_moe", cfg)
    for b in moe.find_moe_blocks(model):
        assert sum(b.sizes) == 128 - 32 and b.unfused
    assert report["expert_params"]["removed_fraction"] == pytest.approx(0.25 * 128 * 3 * 32 / (8 * 32 + 128 * 3 * 32), abs=1e-5)
    path = _save(model, report, cfg, tmp_path / "h")
    with torch.no_grad():
        assert torch.equal(api.load(str(path))(ids()).logits, model(ids()).logits)


@pytest.mark.parametrize("compensate", [True, False])
def test_heapr_beats_removing_the_same_number_of_neurons_at_random(compensate):
    """On the calibration activations, HEAPr's choice keeps the block output closer than random ones."""
    cfg = ExpertPruneConfig(method="heapr", ratio=0.5, protect_super_experts=False, compensate=compensate)
    model, calib = tiny_moe("mixtral"), ids(8, 32)
    path = "model.layers.1.mlp"
    seen = []
    hook = model.get_submodule(path).register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    with torch.no_grad():
        model(calib)
    hook.remove()
    x, full = seen[0]
    stats = experts.collect_stats(model, calib, cfg, device="cpu")

    def error(pruned):
        with torch.no_grad():
            return float((pruned.get_submodule(path)(x) - full).pow(2).sum())

    experts.prune(model, stats, cfg)
    sizes = {b.path: b.sizes for b in moe.find_moe_blocks(model)}
    assert sum(sizes[path]) == 64
    gen = torch.Generator().manual_seed(0)
    random_errors = []
    for _ in range(5):
        rand = tiny_moe("mixtral")
        for b in moe.find_moe_blocks(rand):
            moe.keep_neurons(b, [torch.randperm(16, generator=gen)[:s] for s in sizes[b.path]])
        random_errors.append(error(rand))
    assert error(model) < 0.8 * min(random_errors)


def _with_super_expert(family="mixtral"):
    """Expert 3 of layer 0: rarely routed (router row 0) but with a huge down_proj output."""
    model = tiny_moe(family)
    b = moe.find_moe_blocks(model)[0]
    with torch.no_grad():
        b.router.weight[3] = 0
        b.experts.down_proj[3] *= 1000
    return model


@pytest.mark.parametrize("method", ["frequency", "reap", "random", "reconstruct", "heapr"])
def test_super_experts_are_detected_and_never_removed(method):
    model = _with_super_expert()
    cfg = ExpertPruneConfig(method=method, ratio=0.5, protect_super_experts=True, seed=3)
    stats = experts.collect_stats(model, ids(8, 32), cfg, device="cpu")
    report = experts.prune(model, stats, cfg)
    assert report["super_experts"] == {"model.layers.0.mlp": [3]}
    b = moe.find_moe_blocks(model)[0]
    if method == "heapr":
        assert report["layers"][b.path]["removed_per_expert"][3] == 0
    else:
        assert 3 not in report["layers"][b.path]["removed"] and b.num_experts == 4


def test_a_ratio_the_guard_cannot_meet_is_refused():
    """Protected super experts never go, so a ratio that would need one is refused rather than met short."""
    model = _with_super_expert()
    b = moe.find_moe_blocks(model)[0]
    cfg = ExpertPruneConfig(method="frequency", ratio=0.5, protect_super_experts=True)
    stats = experts.collect_stats(model, ids(8, 32), cfg, device="cpu")
    found = experts.super_experts(stats, cfg.se_quantile, cfg.se_fraction)
    assert found == {b.path: [3]}
    guard = {b.path: [1, 2, 3, 4, 5]}  # five of the eight protected: four removals asked, three possible
    with pytest.raises(UserError, match="asks for 4 of the 8 experts but only 3 are not protected super experts"):
        experts.plan_experts(stats, cfg, guard)
    assert len(experts.plan_experts(stats, cfg, found)[b.path]["removed"]) == 4


def test_without_an_outlier_the_guard_protects_no_expert():
    """The percentile and the tenth of the largest always let the largest maximum through: the top expert of a
    model with no outlier was protected (and reported as a super expert)."""
    model = tiny_moe("mixtral")
    cfg = ExpertPruneConfig(method="frequency", ratio=0.75, protect_super_experts=True)
    stats = experts.collect_stats(model, ids(8, 32), cfg, device="cpu")
    assert experts.super_experts(stats) == {}
    least = {p: sorted(experts.removal_order("frequency", st, 0)[:6]) for p, st in stats.items()}
    report = experts.prune(model, stats, cfg)
    assert report["super_experts"] == {}
    assert {p: r["removed"] for p, r in report["layers"].items()} == least  # (the plan of no guard)
    with pytest.raises(UserError, match="se_median_factor must be ≥ 1"):
        ExpertPruneConfig(se_median_factor=0.5)


def test_without_the_guard_a_rarely_used_super_expert_goes():
    cfg = ExpertPruneConfig(method="frequency", ratio=0.25, protect_super_experts=False)
    model = _with_super_expert()
    report = experts.prune(model, experts.collect_stats(model, ids(8, 32), cfg, device="cpu"), cfg)
    assert 3 in report["layers"]["model.layers.0.mlp"]["removed"]


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_unit_interval(ratio):
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        ExpertPruneConfig(ratio=ratio)


def test_any_seed_orders_random_removal():
    """A large --seed overflowed the generator's seed after the whole calibration pass (a traceback)."""
    st = experts.BlockStats.__new__(experts.BlockStats)
    st.layer, st.num_experts = 1, 8
    for seed in (0, -1, 200_000_000_000_000):
        assert sorted(experts.removal_order("random", st, seed)) == list(range(8))


def test_ratio_that_leaves_fewer_than_top_k():
    cfg = ExpertPruneConfig(method="frequency", ratio=0.9, protect_super_experts=False)
    model = tiny_moe("olmoe")
    with pytest.raises(UserError, match="fewer than top_k = 2"):
        experts.prune(model, experts.collect_stats(model, ids(2, 16), cfg, device="cpu"), cfg)
    with pytest.raises(UserError, match="fewer than top_k"):
        moe.keep_experts(moe.find_moe_blocks(model)[0], [0])


def test_dense_model_has_no_moe_blocks(tiny_model):
    with pytest.raises(UserError, match="has no MoE blocks"):
        moe.require_moe(tiny_model)


# ---- CLI ------------------------------------------------------------------------------------------------

def _save_with_tokenizer(model, path):
    """A model directory with a small byte-level BPE tokenizer (vocab < 300), as the CLI needs one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox"], trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]))
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_cli_prune_then_quantize_and_eval(tmp_path):
    src = _save_with_tokenizer(tiny_moe("qwen3_moe"), tmp_path / "moe")
    runner = CliRunner()
    out = tmp_path / "pruned"
    r = runner.invoke(app, ["prune", "experts", str(src), "--method", "frequency", "--ratio", "0.25", "-o", str(out),
                            "--calib-samples", "2", "--seq-len", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "25.0 % of expert parameters removed" in " ".join(r.output.split())
    assert "llmcomp.load" not in r.output  # (fused experts, one count: stock from_pretrained loads it)
    r = runner.invoke(app, ["prune", "experts", str(src), "--method", "heapr", "--ratio", "0.25", "-o",
                            str(tmp_path / "h"), "--calib-samples", "2", "--seq-len", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output  # (stock from_pretrained filled its unfused experts randomly, silently)
    assert "load it with llmcomp.load" in " ".join(r.output.split())
    stage = api.inspect(out)["stages"][-1]
    assert stage["kind"] == "moe" and stage["shapes"]["model.layers.0.mlp"]["experts"] == 6
    r = runner.invoke(app, ["quantize", str(out), "-o", str(tmp_path / "q"), "--bits", "8", "--group-size", "0"])
    assert r.exit_code == 0, r.output
    model = api.load(str(tmp_path / "q"))
    assert [b.num_experts for b in moe.find_moe_blocks(model)] == [6, 6]
    r = runner.invoke(app, ["eval", str(tmp_path / "q"), "--windows", "1", "--seq-len", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_cli_bad_input(tmp_path, tiny_model_dir):
    src = _save_with_tokenizer(tiny_moe("mixtral"), tmp_path / "moe")
    runner = CliRunner()

    def prune(*args):
        return runner.invoke(app, ["prune", "experts", *map(str, args), "-o", str(tmp_path / "out"),
                                   "--calib-samples", "2", "--seq-len", "16", "--device", "cpu"])

    assert "has no MoE blocks" in one_error_line(prune(tiny_model_dir))
    assert "strictly between 0 and 1" in one_error_line(prune(src, "--ratio", "1"))
    assert "fewer than top_k = 2" in one_error_line(prune(src, "--ratio", "0.9"))
    assert "Unknown expert pruning method" in one_error_line(prune(src, "--method", "magic"))
    assert "LAYER=RATIO" in one_error_line(prune(src, "--layer-ratio", "x"))
    # (taken and ignored before: the last ratio won; only heapr compensates)
    assert "gives layer 0 twice" in one_error_line(prune(src, "--layer-ratio", "0=0.5", "--layer-ratio", "00=0.25"))
    assert "apply to --method heapr" in one_error_line(prune(src, "--method", "reap", "--no-compensate"))
    assert not (tmp_path / "out").exists()


def test_quantize_unfuses_experts_and_allocates_bits_by_routing_mass(tmp_path):
    """MC-MoE-style: each expert linear's error is weighted by its routing mass before the bit allocation;
    a rarely routed expert gets fewer bits, and the quantized experts reload as QuantLinear."""
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig
    from llmcomp.quant.allocate import AllocationConfig

    model = tiny_moe("mixtral")
    with torch.no_grad():
        for b in moe.find_moe_blocks(model):
            b.router.weight[3] = 0  # expert 3: rarely chosen
    src = _save_with_tokenizer(model, tmp_path / "moe")
    cfg = RTNConfig(format=Uniform(bits=4, group_size=0), ignore=("lm_head", "mlp.gate"))
    out = api.quantize(cfg, tmp_path / "q", str(src), calib_samples=8, calib_seq_len=64, device="cpu",
                       allocation=AllocationConfig(budget=5.0, candidates=(2, 8), group_size=0))
    alloc = api.inspect(out)["stages"][-1]["metrics"]["layers"]["_allocation"]
    imp = alloc["expert_importance"]
    for layer in (0, 1):
        down = {e: imp[f"model.layers.{layer}.mlp.experts.down.{e}"] for e in range(8)}
        assert min(down, key=down.get) == 3
    bits = alloc["bits"]
    rare = [bits[n] for n in bits if ".experts." in n and n.endswith(".3")]
    common = [bits[n] for n in bits if ".experts." in n and not n.endswith(".3")]
    assert sum(rare) / len(rare) < sum(common) / len(common)
    loaded = api.load(str(out))
    b = moe.find_moe_blocks(loaded)[0]
    assert b.unfused and isinstance(b.experts.down[0], QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(loaded(ids()).logits).all()


def _moe_with_unrouted_experts(tmp_path):
    """A tiny Mixtral whose router can never pick experts 4-7 (experts 0/1 and 2/3 have opposite router
    rows, so each pair always has a positive logit above their 0)."""
    model = tiny_moe("mixtral")
    with torch.no_grad():
        for b in moe.find_moe_blocks(model):
            w = b.router.weight
            v, u = w[0].clone(), w[2].clone()
            w.zero_()
            w[0], w[1], w[2], w[3] = v, -v, u, -u
    return _save_with_tokenizer(model, tmp_path / "moe")


@pytest.mark.parametrize("compensate", [True, False])
def test_heapr_removes_neurons_no_token_reaches_first_and_the_artifact_loads(tmp_path, compensate):
    """A dead neuron (never routed to) costs nothing to remove. With compensation its dampened diagonal gave it a
    cost of ~1, far above the live neurons', so live ones went first. Emptying two experts then wrote an artifact
    that could not be loaded (their empty tensors, all at storage address 0, were taken for ties)."""
    src = _moe_with_unrouted_experts(tmp_path)
    cfg = ExpertPruneConfig(method="heapr", ratio=0.25, protect_super_experts=False, compensate=compensate)
    out = api.prune_experts(cfg, tmp_path / "h", str(src), calib_samples=8, calib_seq_len=32, device="cpu")
    removed = api.inspect(out)["stages"][-1]["metrics"]["layers"]["model.layers.0.mlp"]["removed_per_expert"]
    assert removed[:4] == [0, 0, 0, 0] and sorted(removed[4:]) == [0, 0, 16, 16]
    from transformers import AutoModelForCausalLM

    x = ids(2, 16, seed=5)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(x).logits
        assert torch.allclose(api.load(out)(x).logits, ref, atol=1e-5)
    if compensate:  # the emptied experts' zero-width linears are left as they are (RTN, GPTQ, allocation crashed)
        from llmcomp.formats import Uniform
        from llmcomp.quant import RTNConfig
        from llmcomp.quant.allocate import AllocationConfig

        kw = dict(calib_samples=4, calib_seq_len=32, device="cpu")
        q = api.quantize(RTNConfig(format=Uniform(bits=4, group_size=0)), tmp_path / "q", str(out), **kw,
                         allocation=AllocationConfig(budget=6.5, candidates=(4, 8), group_size=0))
        with torch.no_grad():
            assert torch.isfinite(api.load(q)(x).logits).all()


def test_gptq_quantizes_experts_without_calibration_tokens_by_their_weights(tmp_path):
    """GPTQ on an MoE with never-routed experts finishes (no "no calibration statistics" error): those
    linears get the identity Hessian, i.e. exactly RTN, are marked in the report, and a warning says so."""
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig
    from llmcomp.quant.gptq import GPTQConfig

    src = _moe_with_unrouted_experts(tmp_path)
    fmt = Uniform(bits=3, group_size=16)
    kw = dict(calib_samples=4, calib_seq_len=64, device="cpu")
    with pytest.warns(UserWarning, match="received no calibration tokens"):
        out = api.quantize(GPTQConfig(format=fmt, ignore=("lm_head", "mlp.gate")), tmp_path / "g", str(src), **kw)
    rtn = api.quantize(RTNConfig(format=fmt, ignore=("lm_head", "mlp.gate")), tmp_path / "r", str(src), device="cpu")
    layers = api.inspect(out)["stages"][-1]["metrics"]["layers"]
    marked = {n for n, m in layers.items() if isinstance(m, dict) and m.get("no_calibration_tokens")}
    assert marked == {f"model.layers.{i}.mlp.experts.{kind}.{e}" for i in (0, 1) for kind in ("gate_up", "down")
                      for e in range(4, 8)}
    g, r = api.load(str(out)).state_dict(), api.load(str(rtn)).state_dict()
    blind = [k for k in g if any(k.startswith(n + ".") for n in marked)]
    routed = [k for k in g if ".experts.gate_up.0." in k and "weight_packed" in k]
    assert blind and all(torch.equal(g[k], r[k]) for k in blind)
    assert routed and not all(torch.equal(g[k], r[k]) for k in routed)  # calibrated experts differ from RTN


@pytest.mark.parametrize("sensitivity", ["output", "fisher"])
def test_allocation_gives_an_expert_without_calibration_tokens_the_cheapest_width(tmp_path, sensitivity):
    """Experts 4-7 are never routed to (``_moe_with_unrouted_experts``): no calibration token reaches their
    linears. They score 0 at every width (no "HessianAccumulator saw no inputs" crash, no missing gradient),
    get the cheapest width, and are listed in the allocation report."""
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig
    from llmcomp.quant.allocate import AllocationConfig

    src = _moe_with_unrouted_experts(tmp_path)
    cfg = RTNConfig(format=Uniform(bits=4, group_size=0), ignore=("lm_head", "mlp.gate"))
    alloc = AllocationConfig(budget=5.0, candidates=(2, 8), group_size=0, sensitivity=sensitivity)
    out = api.quantize(cfg, tmp_path / "q", str(src), calib_samples=4, calib_seq_len=64, device="cpu",
                       allocation=alloc)
    report = api.inspect(out)["stages"][-1]["metrics"]["layers"]["_allocation"]
    unseen = {f"model.layers.{i}.mlp.experts.{kind}.{e}" for i in (0, 1) for kind in ("gate_up", "down")
              for e in range(4, 8)}
    assert set(report["no_calibration_tokens"]) == unseen
    assert all(report["bits"][n] == 2 for n in unseen)
    assert any(b == 8 for n, b in report["bits"].items() if ".experts." in n and n not in unseen)
    assert all(report["expert_importance"][n] == 0 for n in unseen if ".down." in n)


def test_dynamic_skip_threshold_is_recorded_and_reinstalled(tmp_path):
    from llmcomp.core.data import calib_windows
    from llmcomp.prune.mcmoe import DynamicSkipConfig

    src = _save_with_tokenizer(tiny_moe("olmoe"), tmp_path / "moe")
    r = CliRunner().invoke(app, ["prune", "dynamic", str(src), "--rate", "0.2", "-o", str(tmp_path / "d"),
                                 "--calib-samples", "4", "--seq-len", "64", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    stage = api.inspect(tmp_path / "d")["stages"][-1]
    assert 0 < stage["skip_threshold"] < 1 and stage["metrics"]["skipped_slots_calibration"] == pytest.approx(0.2, abs=0.02)

    def skipped(path):
        model, tok = api.load(str(path), return_tokenizer=True)
        weights = []
        hooks = [b.experts.register_forward_hook(lambda m, i, o: weights.append(i[2]))
                 for b in moe.find_moe_blocks(model)]
        with torch.no_grad():
            model(calib_windows(tok, 64, 4, 0))  # the calibration text itself: the calibrated rate comes back
        for h in hooks:
            h.remove()
        return float(torch.cat([w.flatten() for w in weights]).eq(0).double().mean())

    assert skipped(tmp_path / "d") == pytest.approx(0.2, abs=0.02)
    # a second dynamic stage replaces the first, calibrated on unmasked routing (on the masked one a lower rate
    # gave threshold 0, and the first stage's 20 % stayed in force)
    r = CliRunner().invoke(app, ["prune", "dynamic", str(tmp_path / "d"), "--rate", "0.1", "-o", str(tmp_path / "d2"),
                                 "--calib-samples", "4", "--seq-len", "64", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert 0 < api.inspect(tmp_path / "d2")["stages"][-1]["skip_threshold"] < stage["skip_threshold"]
    assert skipped(tmp_path / "d2") == pytest.approx(0.1, abs=0.02)
    with pytest.raises(UserError, match="--rate must be between 0 and 0.5"):
        mcmoe.skip_threshold(tiny_moe("olmoe"), ids(), 0.6, device="cpu")
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        DynamicSkipConfig(rate=0)


def test_a_layer_ratio_must_name_an_moe_layer():
    """A ratio for a layer without an MoE block (or spelled "01") did nothing, silently."""
    from llmcomp.cli.prune_experts import parse_layer_ratios

    assert parse_layer_ratios(["01=0.5"]) == {"1": 0.5}
    cfg = ExpertPruneConfig(method="frequency", ratio=0.25, layer_ratios={"2": 0.5}, protect_super_experts=False)
    with pytest.raises(UserError, match="layer 2, which has no MoE block; MoE blocks are in layers 0, 1"):
        experts.collect_stats(tiny_moe("mixtral"), ids(4, 16), cfg, device="cpu")
    assert ExpertPruneConfig(method="frequency", layer_ratios={"01": 0.5}).ratio_for(1) == 0.5


def test_heapr_on_quantized_experts_is_refused_before_calibration(tmp_path, monkeypatch):
    """It was refused only by the surgery, after the whole calibration pass."""
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig

    src = _save_with_tokenizer(tiny_moe("mixtral"), tmp_path / "moe")
    q = api.quantize(RTNConfig(format=Uniform(bits=4, group_size=16), ignore=("lm_head", "mlp.gate")), tmp_path / "q",
                     str(src), device="cpu")
    monkeypatch.setattr(experts, "collect_stats", lambda *a, **k: pytest.fail("calibrated first"))
    with pytest.raises(UserError, match="this model's experts are quantized; prune the original model"):
        api.prune_experts(ExpertPruneConfig(method="heapr", ratio=0.25), tmp_path / "h", str(q), calib_samples=2,
                          calib_seq_len=16, device="cpu")


@pytest.mark.parametrize("method, ratio, match", [
    ("frequency", 0.9, "leaving fewer than top_k = 2"),
    ("frequency", 0.05, "removes no expert of the 8"),
    ("heapr", 0.001, "removes no neuron of the 128"),
])
def test_ratio_that_the_shape_refuses_fails_before_calibration(tmp_path, monkeypatch, method, ratio, match):
    """These ratios were refused only after the whole calibration pass (hours on a real MoE)."""
    src = _save_with_tokenizer(tiny_moe("mixtral"), tmp_path / "moe")
    monkeypatch.setattr(experts, "collect_stats", lambda *a, **k: pytest.fail("calibrated first"))
    with pytest.raises(UserError, match=match):
        api.prune_experts(ExpertPruneConfig(method=method, ratio=ratio), tmp_path / "p", str(src), calib_samples=2,
                          calib_seq_len=16, device="cpu")


def test_skip_experts_names_a_wrong_config(tmp_path):
    with pytest.raises(UserError, match="config must be a DynamicSkipConfig"):
        api.skip_experts(ExpertPruneConfig(), tmp_path / "s", "unused")


def test_dynamic_skip_keeps_a_bf16_models_dtype(tmp_path):
    """prune dynamic stored a bf16 MoE as float32 (twice the size, for one recorded threshold); --dtype is taken."""
    from safetensors.torch import load_file

    from llmcomp.prune.mcmoe import DynamicSkipConfig

    src = _save_with_tokenizer(tiny_moe("mixtral").to(torch.bfloat16), tmp_path / "src")
    kw = dict(calib_samples=2, calib_seq_len=32, device="cpu")
    kept = api.skip_experts(DynamicSkipConfig(rate=0.3), tmp_path / "dyn", str(src), **kw)
    assert {t.dtype for t in load_file(str(kept / "model.safetensors")).values()} == {torch.bfloat16}
    r = CliRunner().invoke(app, ["prune", "dynamic", str(src), "-o", str(tmp_path / "f16"), "--dtype", "float16",
                                 "--calib-samples", "2", "--seq-len", "32", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert {t.dtype for t in load_file(str(tmp_path / "f16" / "model.safetensors")).values()} == {torch.float16}


def test_pruning_after_a_dynamic_stage_says_its_threshold_is_stale(tmp_path):
    """prune experts after prune dynamic kept the threshold calibrated on the old routing, silently (its skip rate
    moved: 15 % → 17 % on a moefied model)."""
    src = _save_with_tokenizer(tiny_moe("mixtral"), tmp_path / "moe")
    kw = ["--calib-samples", "2", "--seq-len", "32", "--device", "cpu"]
    r = CliRunner().invoke(app, ["prune", "dynamic", str(src), "--rate", "0.2", "-o", str(tmp_path / "d"), *kw])
    assert r.exit_code == 0, r.output
    for source, said in ((src, False), (tmp_path / "d", True)):
        out = tmp_path / f"p{int(said)}"
        r = CliRunner().invoke(app, ["prune", "experts", str(source), "--method", "frequency", "--ratio", "0.25",
                                     "--no-protect-super-experts", "-o", str(out), *kw])
        assert r.exit_code == 0, r.output
        assert ("dynamic skip threshold of an earlier stage" in " ".join(r.output.split())) == said


def test_pruning_experts_after_quantize_renumbers_the_quantize_stage_records(tmp_path):
    """The quantize stage listed the removed experts' linears and the kept ones under their old indices (report and
    eval --compare showed layers that no longer exist, or another expert's bits), and its allocation's b/w counted
    the removed ones (the rarely routed experts an MC-MoE allocation gives fewer bits are the ones frequency pruning
    removes)."""
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig
    from llmcomp.quant.allocate import AllocationConfig

    src = _save_with_tokenizer(tiny_moe("mixtral"), tmp_path / "moe")
    q = api.quantize(RTNConfig(format=Uniform(bits=4, group_size=0), ignore=("lm_head", "mlp.gate")), tmp_path / "q",
                     str(src), calib_samples=4, calib_seq_len=32, device="cpu",
                     allocation=AllocationConfig(budget=5.0, candidates=(2, 8), group_size=0))
    out = api.prune_experts(ExpertPruneConfig(method="frequency", ratio=0.5), tmp_path / "p", str(q), calib_samples=2,
                            calib_seq_len=32, device="cpu")
    stage = api.inspect(out)["stages"][1]
    layers, model = stage["metrics"]["layers"], api.load(str(out))
    alloc = layers["_allocation"]
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {n for n in layers if not n.startswith("_")} == set(quantized) == set(alloc["bits"])
    assert set(stage["config"]["formats"]) == set(quantized)
    assert all(quantized[n].fmt.bits == b for n, b in alloc["bits"].items())  # (each kept expert's own width)
    assert set(alloc["expert_importance"]) == {n for n in quantized if ".experts.down." in n}
    size = {n: m.out_features * m.in_features for n, m in quantized.items()}
    achieved = sum(m.fmt.bits_per_weight(m.out_features, m.in_features) * size[n]
                   for n, m in quantized.items()) / sum(size.values())
    assert alloc["achieved_bits_per_weight"] == pytest.approx(achieved, abs=1e-4)
    assert sum(alloc["layers_per_format"].values()) == len(quantized)
    assert api.stage_label(stage) == f"rtn alloc {achieved:.2f} b/w"
    assert "bits_per_weight" not in stage["metrics"] and stage["metrics"]["bits_per_weight_before_expert_pruning"] > 0
    # the figure stays on show, said to be the one before the pruning (report and info read it under its new key)
    from rich.console import Console

    from llmcomp.cli.render import manifest_tables
    from llmcomp.report import facts, markdown

    bits = stage["metrics"]["bits_per_weight_before_expert_pruning"]
    view = {"stage": stage, "facts": facts.quant_facts(stage), "kind": "quantize"}
    assert markdown._summary(view).startswith(f"{bits:.2f} b/w before expert pruning")
    console = Console(record=True, width=400)
    console.print(manifest_tables(api.inspect(out))[0])
    assert f"{bits} bits/weight before expert pruning" in console.export_text()


def test_stage_records_stay_where_no_expert_was_removed():
    """HEAPr removes neurons, not experts: the earlier stages keep their records and their bits per weight."""
    stages = [{"method": "rtn", "metrics": {"bits_per_weight": 4.25, "layers": {
        "model.layers.0.mlp.experts.down.1": {"sqnr_db": 20.0}}}}]
    assert experts.follow_experts(stages, {"model.layers.0.mlp": []}, None) == stages
    moved = experts.follow_experts(stages, {"model.layers.0.mlp": [0]}, None)[0]["metrics"]
    assert moved == {"bits_per_weight_before_expert_pruning": 4.25,
                     "layers": {"model.layers.0.mlp.experts.down.0": {"sqnr_db": 20.0}}}


def _out_of_memory_driver(real):
    """calibrate_layerwise with a handler that runs out of CUDA memory: the error the caller's flags make."""
    def driver(model, ids, handler, **kwargs):
        def boom(path, layer, runner):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real(model, ids, boom, **kwargs)
    return driver


def test_out_of_memory_names_each_command_s_own_flags(tmp_path, monkeypatch):
    """prune experts said to lower --calib-batch, which only quantize has."""
    from llmcomp.core import calib
    from llmcomp.formats import Uniform
    from llmcomp.quant import GPTQConfig, base

    src = _save_with_tokenizer(tiny_moe("mixtral"), tmp_path / "moe")
    monkeypatch.setattr(experts, "calibrate_layerwise", _out_of_memory_driver(calib.calibrate_layerwise))
    with pytest.raises(UserError) as e:
        api.prune_experts(ExpertPruneConfig(method="frequency", ratio=0.5), tmp_path / "p", str(src),
                          calib_samples=2, calib_seq_len=32, device="cpu")
    assert "lower --calib-samples or --seq-len, or run with --device cpu" in str(e.value)
    assert "--calib-batch" not in str(e.value)
    monkeypatch.setattr(base, "calibrate_layerwise", _out_of_memory_driver(calib.calibrate_layerwise))
    with pytest.raises(UserError, match="lower --calib-batch, or calibrate with --device cpu"):
        api.quantize(GPTQConfig(format=Uniform(bits=4, group_size=0)), tmp_path / "q", str(src), calib_samples=2,
                     calib_seq_len=32, device="cpu")
