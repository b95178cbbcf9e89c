import torch

from llmcomp.core.calib import calibrate_layerwise


def test_layerwise_driver_reproduces_full_forward(tiny_model):
    """With an identity handler, the driver's final hidden states equal the model's own."""
    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    seen, outs = [], {}

    def handler(path, layer, runner):
        seen.append(path)
        outs[path] = runner.run()

    calibrate_layerwise(tiny_model, ids, handler, batch_size=4)  # 4 → 3: batches must be equal-sized
    assert seen == ["model.layers.0", "model.layers.1"]
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[i] is the input of layer i; the last entry has the final norm applied.
    got1 = torch.cat(outs["model.layers.0"])
    assert torch.allclose(got1, ref[1], atol=1e-5)


def test_hooks_observe_every_batch(tiny_model):
    ids = torch.randint(0, 128, (4, 8))
    counts = []

    def handler(path, layer, runner):
        n = [0]

        def hook(mod, inp, out):
            n[0] += inp[0].shape[0] * inp[0].shape[1]

        runner.run({layer.mlp.down_proj: hook})
        counts.append(n[0])

    calibrate_layerwise(tiny_model, ids, handler, batch_size=2)
    assert counts == [32, 32]


def test_modified_layer_feeds_next_layer(tiny_model):
    """Zeroing layer 0's MLP changes what layer 1 sees (outputs are pushed forward after the handler)."""
    ids = torch.randint(0, 128, (2, 8))
    inputs_seen = {}

    def handler(path, layer, runner):
        inputs_seen[path] = torch.cat(runner.inputs).clone()
        if path.endswith(".0"):
            layer.mlp.down_proj.weight.data.zero_()

    calibrate_layerwise(tiny_model, ids, handler)
    with torch.no_grad():
        h = tiny_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert torch.allclose(inputs_seen["model.layers.1"], h[1], atol=1e-5)  # model itself now has zeroed MLP


def test_shared_input_groups(tiny_model):
    """q/k/v read the same normed input, gate/up another: the driver gives each group one stats object."""
    from llmcomp.quant.base import shared_input_groups

    ids = torch.randint(0, 128, (2, 8))
    found = {}

    def handler(path, layer, runner):
        names = {m: n for n, m in layer.named_modules()}
        lin = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        found[path] = sorted(sorted(names[m] for m in g) for g in shared_input_groups(runner, lin))

    calibrate_layerwise(tiny_model, ids, handler)
    assert found["model.layers.0"] == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                       ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]


def test_the_driver_walks_gpt_neox_layers():
    """GPT-NeoX (Pythia) keeps its layers at gpt_neox.layers: every calibrated method said "Unsupported
    architecture GPTNeoXForCausalLM: no decoder layer list found" (RTN, which needs no driver, ran)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, vocab_size=128,
                                             max_position_embeddings=256)).eval()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    outs = {}
    calibrate_layerwise(model, ids, lambda path, layer, runner: outs.__setitem__(path, runner.run()), batch_size=2)
    assert list(outs) == [f"gpt_neox.layers.{i}" for i in range(3)]
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(2):  # (the last entry has the final norm applied)
        assert torch.allclose(torch.cat(outs[f"gpt_neox.layers.{i}"]), ref[i + 1], atol=1e-5)
