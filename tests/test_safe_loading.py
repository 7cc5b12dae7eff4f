"""No code from a model folder runs unless the user asks (``trust_remote_code`` / ``--trust-remote-code``).

A model folder can name Python files in ``config.json``'s ``auto_map``; here such a file writes
a marker when imported, so "was it run?" is a file on disk, checked through every loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_model
from resp_plugin import RESPConfig, load_pruned, prune
from resp_plugin.cli import main
from resp_plugin.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
FOREIGN_CODE = '''
from pathlib import Path

from transformers import Qwen3ForCausalLM

Path({marker!r}).write_text("foreign code ran")


class ForeignForCausalLM(Qwen3ForCausalLM):
    pass
'''


def _with_foreign_code(folder: Path, marker: Path, **config_changes) -> Path:
    """Give ``folder`` a modeling file of its own, named in auto_map, that leaves ``marker`` when run."""
    (folder / "modeling_foreign.py").write_text(FOREIGN_CODE.format(marker=str(marker)))
    conf = json.loads((folder / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_foreign.ForeignForCausalLM"}
    conf.update(config_changes)
    (folder / "config.json").write_text(json.dumps(conf))
    return folder


@pytest.fixture
def foreign(tmp_path, tokenizer) -> tuple[Path, Path]:
    """A dense qwen3 folder whose auto_map points at foreign code, and that code's marker file."""
    folder = tmp_path / f"foreign-{tmp_path.name}"  # a name of its own: transformers caches modules by folder
    make_model("qwen3").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "marker"
    return _with_foreign_code(folder, marker), marker


def test_load_pruned_runs_folder_code_only_when_trusted(foreign):
    folder, marker = foreign
    model = load_pruned(folder)
    assert not marker.exists() and type(model).__name__ == "Qwen3ForCausalLM"
    model = load_pruned(folder, trust_remote_code=True)
    assert marker.read_text() == "foreign code ran" and type(model).__name__ == "ForeignForCausalLM"


def test_cli_prune_runs_folder_code_only_with_flag(foreign, gold_file, tmp_path):
    folder, marker = foreign
    args = ["prune", str(folder), "--sparsity", "0.2", "--step", "0.2", "--calibration", "gold",
            "--prompts", f"jsonl:{gold_file}", "--device", "cpu", "--protected-layers", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert not marker.exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--trust-remote-code"]) == 0
    assert marker.exists()


def test_code_only_model_type_is_refused_without_flag(tmp_path, tokenizer, capsys):
    """A model type transformers does not know cannot load without its code: one clear error, nothing run."""
    folder = tmp_path / "custom"
    make_model("qwen3").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "marker"
    _with_foreign_code(folder, marker, model_type="foreign_lm")
    with pytest.raises(UserError, match=r"needs its own Python code.*--trust-remote-code"):
        load_pruned(folder)
    assert main(["eval", str(folder), "--tasks", "resp_gsm8k", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "pass --trust-remote-code" in err and "Traceback" not in err
    assert not marker.exists()


def _pruned(tmp_path: Path, tokenizer, gold_file, arch: str = "qwen3"):
    model = make_model(arch)
    cfg = RESPConfig(sparsity=0.3, step=0.15, calibration="gold", prompts=f"jsonl:{gold_file}",
                     protected_layers=[0])
    prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    return model, tmp_path / "run" / "model"


def test_pruned_checkpoint_never_runs_its_bundled_file(tmp_path, tokenizer, gold_file):
    """load_pruned builds RESP checkpoints with the installed classes, whatever file the folder carries."""
    model, path = _pruned(tmp_path, tokenizer, gold_file)
    marker = tmp_path / "marker"
    bundled = path / "modeling_resp.py"
    bundled.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n" + bundled.read_text())
    x = torch.randint(8, 80, (2, 9))
    for trust in (False, True):
        again = load_pruned(path, trust_remote_code=trust).eval()
        assert (again(x).logits - model(x).logits).abs().max().item() == 0.0
    assert not marker.exists()


def test_checkpoint_of_the_previous_format_still_loads(tmp_path, tokenizer, gold_file):
    """Checkpoints written before layout.py was shipped: the same config fields, the old modeling file alone."""
    from transformers import AutoModelForCausalLM

    model, path = _pruned(tmp_path, tokenizer, gold_file, arch="llama")
    old = tmp_path / f"old-{tmp_path.name}"
    shutil.copytree(path, old)
    (old / "layout.py").unlink()
    (old / "README.md").unlink()
    shutil.copyfile(FIXTURES / "checkpoint_v0" / "modeling_resp.py", old / "modeling_resp.py")
    conf = json.loads((old / "config.json").read_text())
    assert conf["auto_map"] == {"AutoModelForCausalLM": "modeling_resp.RESPLlamaForCausalLM"}
    assert conf["architectures"] == ["RESPLlamaForCausalLM"]
    x = torch.randint(8, 80, (2, 9))
    ref = model(x).logits
    assert (load_pruned(old).eval()(x).logits - ref).abs().max().item() == 0.0
    remote = AutoModelForCausalLM.from_pretrained(old, trust_remote_code=True).eval()  # the old file itself
    assert (remote(x).logits - ref).abs().max().item() == 0.0


def _as_saved_by_v1(path: Path, dest: Path) -> Path:
    """``path`` as the release before the loader split wrote it: its own explicit-class modeling_resp.py
    and layout.py, no kv_attention.py, no ``resp_spec`` in config.json."""
    shutil.copytree(path, dest)
    (dest / "kv_attention.py").unlink()
    for name in ("modeling_resp.py", "layout.py"):
        shutil.copyfile(FIXTURES / "checkpoint_v1" / name, dest / name)
    conf = json.loads((dest / "config.json").read_text())
    del conf["resp_spec"]
    (dest / "config.json").write_text(json.dumps(conf))
    return dest


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_checkpoint_of_the_release_before_the_loader_split_still_loads(arch, tmp_path, tokenizer, gold_file):
    """Its auto_map names ``modeling_resp.RESP<Arch>ForCausalLM``: the installed loader (through the
    registry's spec; a MoE model needs it, as the config records none) and its own file both rebuild it."""
    from test_moe import make_moe
    from transformers import AutoModelForCausalLM

    model = make_moe(arch) if arch == "qwen3_moe" else make_model(arch)
    cfg = RESPConfig(sparsity=0.3, step=0.15, calibration="gold", prompts=f"jsonl:{gold_file}",
                     protected_layers=[0])
    prune(model, tokenizer, cfg, out=tmp_path / "run", progress=False)
    old = _as_saved_by_v1(tmp_path / "run" / "model", tmp_path / f"v1-{arch}-{tmp_path.name}")
    cls = type(model).__name__
    assert json.loads((old / "config.json").read_text())["auto_map"] == {
        "AutoModelForCausalLM": f"modeling_resp.RESP{cls}"}
    x = torch.randint(8, 80, (2, 9))
    ref = model(x).logits
    assert (load_pruned(old).eval()(x).logits - ref).abs().max().item() == 0.0
    remote = AutoModelForCausalLM.from_pretrained(old, trust_remote_code=True).eval()  # the v1 file itself
    assert (remote(x).logits - ref).abs().max().item() == 0.0


def test_the_installed_loader_keeps_the_class_paths_checkpoints_name():
    """``resp_plugin.structures.modeling_resp.RESP<Arch>`` (the path saved checkpoints' auto_map and pickles
    name) stays importable, one class per name."""
    from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM

    from resp_plugin.structures import modeling_resp
    from resp_plugin.structures.modeling_resp import RESPLlamaForCausalLM

    assert issubclass(RESPLlamaForCausalLM, LlamaForCausalLM)
    assert modeling_resp.RESPLlamaForCausalLM is RESPLlamaForCausalLM
    assert issubclass(modeling_resp.RESPQwen3MoeForCausalLM, Qwen3MoeForCausalLM)
    with pytest.raises(AttributeError):
        assert modeling_resp.RESPNoSuchModelForCausalLM is None  # never reached: the access raises
