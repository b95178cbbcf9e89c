"""The bench scripts' row selection: a mistyped --only name measured nothing and exited 0 (quality.py and
gptq_memory.py then wrote over --out, a committed results file by default)."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,more", [("quality", []), ("gptq_memory", []), ("linearize", []),
                                       ("experts", ["--moe", "no-such-moe"])])
def test_an_unknown_only_name_is_refused_and_out_kept(name, more, tmp_path, capsys):
    out = tmp_path / "rows.json"
    out.write_text('{"rows": [{"name": "precious"}]}')
    with pytest.raises(SystemExit) as exc:
        _script(name).main(["--only", "bogus", "--out", str(out), *more])
    said = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown" in said and "'bogus'" in said, said
    assert out.read_text() == '{"rows": [{"name": "precious"}]}'
