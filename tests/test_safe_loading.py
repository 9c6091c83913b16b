"""Safe loading: weights are safetensors only and nothing is unpickled from a checkpoint; the three
model files (what `trust_remote_code` runs) import only the standard library, torch, numpy, Pillow
and public transformers names; the README pins a `revision` next to `trust_remote_code`.
"""

from __future__ import annotations

import ast
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from phi3mm.build import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ["configuration_phi3_projector.py", "modeling_phi3_projector.py", "processing_multimodal.py"]
ALLOWED_PACKAGES = {"torch", "numpy", "PIL", "transformers"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}


def imports(path: Path) -> list[tuple[str, list[str], bool, int]]:
    """(module, imported names, guarded by `try: ... except ImportError`, relative level) of every import."""
    tree = ast.parse(path.read_text())
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            guarded.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], id(node) in guarded, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [a.name for a in node.names], id(node) in guarded, node.level))
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_import_only_the_standard_library_torch_numpy_pillow_and_public_transformers(name):
    siblings = {Path(f).stem for f in MODEL_FILES}
    for module, names, guarded, level in imports(ROOT / name):
        top = module.split(".")[0]
        if level or top in siblings:  # each other, relatively (as Hub code) or from the repository root
            assert module in siblings, f"{name}: relative import of {module!r}"
            continue
        if top == "transformers":
            private = [part for part in module.split(".") + names if part.startswith("_")]
            assert not private, f"{name}: private transformers name(s) {private} in 'from {module} import ...'"
            continue
        if top in ALLOWED_PACKAGES or top in sys.stdlib_module_names:
            continue
        assert guarded, f"{name}: {module!r} is neither allowed nor imported inside try/except ImportError"

    # transformers' own scan (what it asks a user to install before running the remote code) agrees.
    from transformers.dynamic_module_utils import get_imports

    needed = {m for m in get_imports(ROOT / name) if m not in sys.stdlib_module_names}
    assert needed <= ALLOWED_PACKAGES, needed


def test_import_rules_catch_what_they_are_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom transformers.utils import _private\nimport scipy\n"
        "try:\n    import soundfile\nexcept ImportError:\n    soundfile = None\n"
    )
    found = {module: (names, guarded) for module, names, guarded, _ in imports(bad)}
    assert found["transformers.utils"] == (["_private"], False) and found["scipy"] == ([], False)
    assert found["soundfile"] == ([], True) and found["os"] == ([], False)


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("safe") / "checkpoint")


def test_checkpoint_weights_are_safetensors_only(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert "model.safetensors" in files or "model.safetensors.index.json" in files, files
    assert not {p.name for p in checkpoint.iterdir() if p.suffix in PICKLE_SUFFIXES}, files


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, Refused if name == "Unpickler" else refuse)


def test_loading_through_the_auto_classes_unpickles_nothing(checkpoint, no_unpickling, tiny):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    reference = tiny[0].state_dict()
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert processor.image_seq_length == tiny[1].image_seq_length


def test_the_app_refuses_a_pickled_checkpoint_without_running_it(checkpoint, tmp_path):
    from space import app

    planted = shutil.copytree(checkpoint, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors*"))
    marker = tmp_path / "the_pickle_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (planted / "pytorch_model.bin").write_bytes(pickle.dumps({"model.lm_head.weight": Payload()}))
    with pytest.raises(app.ModelLoadError, match="safetensors"):
        app.load_model(str(planted))
    assert not marker.exists()


def test_trainer_checkpoints_are_read_with_torch_weights_only():
    """Resuming reads optimizer / scheduler / RNG state with torch.load(weights_only=True), which
    refuses anything but tensors and plain containers; weights come from safetensors. Checked in the
    installed transformers, so an upgrade that changes it fails here."""
    import transformers.trainer

    tree = ast.parse(Path(transformers.trainer.__file__).read_text())
    loads = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
    ]  # fmt: skip
    assert loads
    for call in loads:
        weights_only = [k.value for k in call.keywords if k.arg == "weights_only"]
        assert weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True, (
            f"transformers/trainer.py:{call.lineno} calls torch.load without weights_only=True"
        )
    # And nothing in this repository unpickles: no torch.load / pickle / np.load(allow_pickle) in its code.
    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("phi3mm/*.py"), *ROOT.glob("space/*.py")]:
        text = path.read_text()
        if re.search(r"\btorch\.load\(|\bpickle\.|\bjoblib\.|allow_pickle\s*=\s*True", text):
            offenders.append(path.name)
    assert not offenders, offenders


def test_readme_pins_a_revision_with_trust_remote_code():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    calls = []
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                keywords = {k.arg for k in node.keywords}
                if "trust_remote_code" in keywords:
                    calls.append((ast.unparse(node.func.value), "revision" in keywords))
    assert {owner for owner, _ in calls} >= {"AutoModelForCausalLM", "AutoProcessor"}, calls
    assert all(pinned for _, pinned in calls), f"trust_remote_code without revision: {calls}"
    assert re.search(r"[Pp]in\w* .*revision", readme), "the README should say to pin a revision"
