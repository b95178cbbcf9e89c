"""Memory controls (core/memory.py): --max-memory specs, the GPU cap, accelerate placement for load/eval,
and the calibration driver's memory behaviour (replaced layers freed, activations kept off the device)."""
import gc
import weakref

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.core import memory
from llmcomp.core.artifact import write_artifact
from llmcomp.core.calib import calibrate_layerwise
from llmcomp.errors import UserError
from llmcomp.formats import Uniform
from llmcomp.quant import RTNConfig, quantize_model
from llmcomp.quant.gptq import GPTQConfig
from tests.conftest import save_char_model, tiny_llama

GiB, MiB = 2**30, 2**20
GPU = torch.cuda.is_available()
no_gpu = pytest.mark.skipif(GPU, reason="checks the behaviour without a visible GPU")


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-equal on CPU; where a GPU is visible a placement may put layers on it, whose numerics differ (the quantized
    layers by up to 3.4e-4 on an H100: its kernels)."""
    if GPU:
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-3, atol=2e-3)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec,expected", [
    ("cuda:0=2GiB,cpu=24GiB", {0: 2 * GiB, "cpu": 24 * GiB}),
    ("0=2GiB", {0: 2 * GiB}),
    (" cuda:1 = 1.5GB , CPU=512MiB ", {1: 1_500_000_000, "cpu": 512 * MiB}),
    ("cuda=100MB", {0: 100_000_000}),
    ("cpu=2048", {"cpu": 2048}),
    ("cpu=3KiB,1=2kb", {"cpu": 3072, 1: 2000}),
])
def test_parse_max_memory(spec, expected):
    assert memory.parse_max_memory(spec) == expected


def test_parse_max_memory_dict_and_none():
    assert memory.parse_max_memory(None) is None
    assert memory.parse_max_memory({0: "1GiB", "cpu": 1000}) == {0: GiB, "cpu": 1000}


@pytest.mark.parametrize("spec,message", [
    ("", "is empty"),
    ("2GiB", "is not DEVICE=SIZE"),
    ("cuda:0=", "is not DEVICE=SIZE"),
    ("=2GiB", "is not DEVICE=SIZE"),
    ("gpu=2GiB", "is not cuda:N, N or cpu"),
    ("cuda:x=1GiB", "is not cuda:N, N or cpu"),
    ("cuda:0=2XB", "is not a size"),
    ("cuda:0=lots", "is not a size"),
    ("cuda:0=-1GiB", "is not a size"),
    ("cuda:0=0GiB", "more than 0 bytes"),
    ("0=1GiB,cuda:0=2GiB", "names cuda:0 twice"),
])
def test_parse_max_memory_rejects(spec, message):
    with pytest.raises(UserError, match=message) as e:
        memory.parse_max_memory(spec)
    assert "\n" not in str(e.value)


def test_format_bytes():
    assert memory.format_bytes(2 * GiB) == "2 GiB"
    assert memory.format_bytes(1536 * MiB) == "1.5 GiB"
    assert memory.format_bytes(100) == "100 B"


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "cpu", "device_map": "cpu"}, "pass one of them"),
    ({"device_map": "gpu"}, "is not one of"),
    ({"device_map": "cpu", "max_memory": "cpu=1GiB"}, "applies to --device-map auto"),
    ({"device_map": "cpu", "offload_folder": "x"}, "applies to --device-map auto"),
    ({"device": "cpu", "max_memory": "cpu=1GiB"}, "pass one of them"),  # (was model.to on a dispatched model)
    ({"device": "cpu", "offload_folder": "x"}, "pass one of them"),
])
def test_resolve_placement_rejects(kwargs, message):
    args = {"device": None, "device_map": None, "max_memory": None, "offload_folder": None, **kwargs}
    with pytest.raises(UserError, match=message):
        memory.resolve_placement(**args)


def test_resolve_placement_implies_auto():
    assert memory.resolve_placement(None, None, "cpu=1GiB", None) == (None, "auto", {"cpu": GiB}, None)
    assert memory.resolve_placement(None, None, None, "off")[1] == "auto"
    assert memory.resolve_placement("cpu", None, None, None) == ("cpu", None, None, None)


@no_gpu
def test_without_gpu_gpu_limits_are_ignored_and_the_cap_is_a_no_op():
    assert memory.gpu_limits({0: GiB, "cpu": GiB}) == {}
    with memory.gpu_cap({}):
        assert memory.active_cap("cuda:0") is None
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        memory.resolve_placement(None, "cuda", None, None)


def test_out_of_memory_message_names_layer_and_cap(monkeypatch):
    monkeypatch.setitem(memory._ACTIVE, 0, 2 * GiB)
    msg = str(memory.out_of_memory("Decoder layer model.layers.3", "cuda:0"))
    assert msg.startswith("Decoder layer model.layers.3 does not fit in the 2 GiB GPU limit set by --max-memory")
    assert "lower --calib-samples or --seq-len, or run with --device cpu" in msg and "\n" not in msg
    assert "--calib-batch" in str(memory.out_of_memory("Decoder layer 3", "cuda:0", memory.QUANTIZE_REMEDY))
    assert str(memory.out_of_memory("Decoder layer model.layers.3", "cpu")).startswith(
        "Decoder layer model.layers.3 does not fit in the memory of cpu;")


def test_driver_turns_out_of_memory_into_one_line_naming_the_layer(tiny_model):
    def handler(path, layer, runner):
        if path.endswith(".1"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(UserError, match=r"^Decoder layer model\.layers\.1 does not fit"):
        calibrate_layerwise(tiny_model, torch.randint(0, 128, (2, 8)), handler)


def test_replaced_linears_are_freed_layer_by_layer():
    """The driver must not keep a finished layer's original nn.Linear modules alive: on a GPU they would
    stay there (the leak behind the 5.8 GB peak of bench/results/gptq_memory_h100.json)."""
    model = tiny_llama(layers=3)
    originals = {i: [weakref.ref(m) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
                 for i, layer in enumerate(model.model.layers)}
    alive_after = []

    class Watch(api.Progress):
        def advance(self, task, n=1):  # called once a decoder layer is finished and back home
            gc.collect()
            alive_after.append([sum(r() is not None for r in refs) for refs in originals.values()])

    quantize_model(model, GPTQConfig(format=Uniform(bits=4, group_size=32)), torch.randint(0, 128, (4, 16)),
                   device="cpu", progress=Watch())
    # after layer i: layers ≤ i have no original linear left; later layers still have all 7
    assert alive_after[-3:] == [[0, 7, 7], [0, 0, 7], [0, 0, 0]]


def test_gptq_under_a_cap_gives_identical_weights(monkeypatch):
    """Under a cap the driver keeps activations at home and GPTQ parks idle Hessians there; on a CPU-only
    machine the copies are no-ops, so this checks the code path (the GPU bench checks the copies)."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = GPTQConfig(format=Uniform(bits=3, group_size=32))
    plain = tiny_llama()
    quantize_model(plain, cfg, ids, device="cpu")
    monkeypatch.setattr(memory, "active_cap", lambda device=None: GiB)
    capped = tiny_llama()
    quantize_model(capped, cfg, ids, device="cpu")
    a, b = plain.state_dict(), capped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hook_only_pass_keeps_no_outputs(tiny_model):
    seen = []

    def handler(path, layer, runner):
        n = [0]
        assert runner.run({layer.mlp.down_proj: lambda *a: n.__setitem__(0, n[0] + 1)}, keep_outputs=False) is None
        seen.append(n[0])

    calibrate_layerwise(tiny_model, torch.randint(0, 128, (4, 8)), handler, batch_size=2)
    assert seen == [2, 2]


def test_activations_beyond_free_cpu_memory_are_refused_before_the_capture(tiny_model, monkeypatch):
    """--calib-samples 200000 on the bundled model (439 GiB of activations) was ended by the OOM killer without a
    word. The first batch's capture tells the need: 4 windows × 8 tokens × 64 float32 values, two copies."""
    seen = []
    need = 2 * 4 * 8 * 64 * 4 - 2 * 8 * 64 * 4  # (the first batch of 2 windows is held already)
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: need - 1)
    with pytest.raises(UserError, match=r"4 windows × 8 tokens × 64 float32 .* lower --calib-samples or --seq-len"):
        calibrate_layerwise(tiny_model, torch.randint(0, 128, (4, 8)), lambda *a: seen.append(a), batch_size=2)
    assert seen == []
    monkeypatch.setattr(memory, "available_cpu_bytes", lambda: need)
    calibrate_layerwise(tiny_model, torch.randint(0, 128, (4, 8)), lambda *a: seen.append(a), batch_size=2)
    assert len(seen) == 2


@pytest.mark.parametrize("files", [{"memory.max": "3000000\n", "memory.current": "1000000\n"},
                                   {"memory/memory.limit_in_bytes": "3000000",
                                    "memory/memory.usage_in_bytes": "1000000"}],
                         ids=["cgroup v2", "cgroup v1"])
def test_free_cpu_memory_is_capped_by_the_cgroup(tmp_path, monkeypatch, files):
    """MemAvailable is the host's: in a container the OOM killer acts at the cgroup's cap, far below it."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(memory, "CGROUP", tmp_path)
    assert memory.available_cpu_bytes() == 2000000
    (tmp_path / next(iter(files))).write_text("max\n" if "memory.max" in files else str(2 ** 63 - 4096))
    assert memory.available_cpu_bytes() > 2000000  # (no cap: the host's MemAvailable)


# -- load / eval placement -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    model = tiny_llama(layers=4)
    model.save_pretrained(root / "hf")
    quantize_model(model, RTNConfig(format=Uniform(bits=4, group_size=32)))
    write_artifact(root / "art", model, None, base_model={"name": "tiny"}, stages=[])
    return root


@pytest.mark.parametrize("kind", ["hf", "art"])
@pytest.mark.parametrize("placement", [
    {"device_map": "cpu"},
    {"max_memory": "cpu=1GiB"},
    {"max_memory": "cuda:0=1GiB,cpu=100KiB", "offload_folder": "OFF"},
    {"device_map": {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                    "lm_head": "cpu"}, "offload_folder": "OFF"},  # (each error named what the other forbade)
], ids=["device_map=cpu", "max_memory", "disk-offload", "explicit-map-with-disk"])
def test_placed_load_gives_the_same_logits(paths, tmp_path, kind, placement):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = api.load(paths / kind)(ids).logits
        placement = {k: (str(tmp_path / "off") if v == "OFF" else v) for k, v in placement.items()}
        net = api.load(paths / kind, **placement)
        same(net(ids.to(memory.input_device(net))).logits, ref)  # (on a GPU machine all of it may sit on cuda:0)
    if kind == "art" and "offload_folder" in placement and not GPU:  # 141 KiB over 100 KiB of CPU: layers on disk
        where = memory.device_summary(net)
        assert where.get("disk", 0) > 0 and where.get("cpu", 0) > 0, where
        assert memory.input_device(net) == torch.device("cpu")


@no_gpu  # (a visible GPU holds what 100 KiB of CPU does not: nothing goes to disk there)
@pytest.mark.parametrize("kind", ["hf", "art"])
def test_over_budget_without_offload_folder_is_one_error(paths, kind):
    """A plain model went to disk silently (transformers offloads it without a folder), where an artifact asked."""
    stored = safe_open(str(paths / "hf" / "model.safetensors"), framework="pt")
    size = memory.format_bytes(sum(stored.get_tensor(k).nbytes for k in stored.keys())) if kind == "hf" else ""
    with pytest.raises(UserError, match=rf"The model \({size}.*\) does not fit in --max-memory on GPU and CPU; pass "
                                        r"--offload-folder DIR to keep the rest on disk, or raise the limits\."):
        api.load(paths / kind, max_memory="cpu=100KiB")
    disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
            "lm_head": "cpu"}  # (no --max-memory was given: the map asks for disk)
    with pytest.raises(UserError, match=r"^The device map puts part of the model on disk; pass --offload-folder"):
        api.load(paths / kind, device_map=disk)


@no_gpu
def test_a_plain_model_over_budget_is_refused_before_it_is_loaded(paths, monkeypatch):
    """The refusal came after from_pretrained had read (and offloaded) every weight: minutes for a large model."""
    from transformers import AutoModelForCausalLM

    late = {}
    with monkeypatch.context() as m:  # (the check after the load: the message is the same)
        m.setattr(memory, "refuse_disk", lambda *args: None, raising=False)
        with pytest.raises(UserError) as after:
            api.load(paths / "hf", max_memory="cpu=100KiB")
        with pytest.raises(UserError) as after_map:
            api.load(paths / "hf", device_map={"": "disk"})

    def loaded(*args, **kwargs):
        late["loaded"] = True
        raise AssertionError("from_pretrained ran")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loaded)
    with pytest.raises(UserError) as before:
        api.load(paths / "hf", max_memory="cpu=100KiB")
    with pytest.raises(UserError) as before_map:
        api.load(paths / "hf", device_map={"": "disk"})
    assert not late and str(before.value) == str(after.value) and str(before_map.value) == str(after_map.value)
    with pytest.raises(AssertionError, match="from_pretrained ran"):  # (one it may hold is not refused)
        api.load(paths / "hf", max_memory="cpu=1GiB")


def test_quantized_layers_placed_off_device_keep_no_weight_cache(paths, tmp_path):
    from llmcomp.core.qlinear import QuantLinear

    net = api.load(paths / "art", max_memory="cpu=100KiB", offload_folder=str(tmp_path / "off"))
    assert all(not m.cache_dequantized for m in net.modules() if isinstance(m, QuantLinear))


# -- CLI ---------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    return save_char_model(tmp_path_factory.mktemp("cm") / "tiny", layers=2)


def _quantize(char_model, out, *extra):
    r = runner.invoke(app, ["quantize", str(char_model), "-o", str(out), "--method", "gptq", "--bits", "4",
                            "--group-size", "32", "--calib-samples", "4", "--seq-len", "32", "--device", "cpu",
                            *extra])
    assert r.exit_code == 0, r.output
    return r


def _weights(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@no_gpu
def test_quantize_max_memory_without_gpu_is_a_no_op(char_model, tmp_path):
    _quantize(char_model, tmp_path / "plain")
    r = _quantize(char_model, tmp_path / "capped", "--max-memory", "cuda:0=1GiB,cpu=4GiB")
    assert "No GPU is visible" in r.output
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "capped")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_calib_batch(char_model, tmp_path):
    _quantize(char_model, tmp_path / "b1", "--calib-batch", "1")
    assert (tmp_path / "b1" / "model.safetensors").exists()


def test_a_calib_batch_that_does_not_divide_the_samples_is_named(char_model, tmp_path):
    """--calib-batch 3 over 4 samples ran as batches of 2 without a word."""
    r = _quantize(char_model, tmp_path / "b3", "--calib-batch", "3")
    assert "--calib-batch 3 runs as 2" in r.output
    assert "runs as" not in _quantize(char_model, tmp_path / "b4", "--calib-batch", "4").output
    assert "runs as" not in _quantize(char_model, tmp_path / "b9", "--calib-batch", "9").output


def test_eval_with_device_map_and_offload(paths, tmp_path, char_model):
    out = tmp_path / "q"
    _quantize(char_model, out)
    base = runner.invoke(app, ["eval", str(out), "--windows", "2", "--seq-len", "16", "--device", "cpu",
                               "--json", str(tmp_path / "a.json")])
    placed = runner.invoke(app, ["eval", str(out), "--windows", "2", "--seq-len", "16", "--max-memory", "cpu=20KiB",
                                 "--offload-folder", str(tmp_path / "off"), "--json", str(tmp_path / "b.json")])
    assert base.exit_code == 0 and placed.exit_code == 0, placed.output
    import json

    a, b = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert a[0]["ppl"] == (pytest.approx(b[0]["ppl"], rel=1e-4) if GPU else b[0]["ppl"])  # (see same)


def test_tied_weights_count_once_in_the_model_size():
    """The bundled model's tied embeddings were counted twice (621 MiB for 538 MB of tensors), so a --max-memory
    cpu=... it fits in was refused."""
    from conftest import tiny_llama
    from llmcomp.core.memory import state_bytes

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    unique = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for _, b in model.named_buffers() if _ in state)
    assert state_bytes(state) == unique < sum(t.numel() * t.element_size() for t in state.values())
