"""Named presets, kept as data."""
from llmcomp.formats.uniform import Uniform
from llmcomp.quant.rtn import RTNConfig
from llmcomp.quant.gptq import GPTQConfig

PRESETS = {
    "w8": RTNConfig(format=Uniform(bits=8, group_size=0, symmetric=True)),
    "w4g128": RTNConfig(format=Uniform(bits=4, group_size=128)),
    "w4g64": RTNConfig(format=Uniform(bits=4, group_size=64)),
    "w4": RTNConfig(format=Uniform(bits=4, group_size=0)),
    "w3g128": RTNConfig(format=Uniform(bits=3, group_size=128)),
    "w2g64": RTNConfig(format=Uniform(bits=2, group_size=64)),
    "gptq-w4g128": GPTQConfig(format=Uniform(bits=4, group_size=128)),
    "gptq-w3g128": GPTQConfig(format=Uniform(bits=3, group_size=128)),
    "gptq-w2g64": GPTQConfig(format=Uniform(bits=2, group_size=64)),
}
