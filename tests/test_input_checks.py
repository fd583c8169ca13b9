"""Bad input found by review: each ends in one line and the right exit code.

``cdft embed --backbone`` takes ``--weights`` offline and checks its inputs before looking
for weights; ``--seed`` is bounded by what numpy's fold shuffle takes; a YAML key given
twice is refused; a weights pickle that needs full unpickling is refused without relaying
torch's advice to unpickle it; and ``--debug`` does not ask the user to rerun with ``--debug``.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers_engine import engine_data, invoke, quick_args
from safetensors.torch import save_file

from cdft_core.errors import CdftError, UsageError


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    root, _ = engine_data(tmp_path_factory)
    return str(sorted(Path(root).rglob("*.png"))[0].parent)


def _error_line(code: int, err: str, exit_code: int) -> str:
    """The one stderr line (checked: exit code, a single line, no traceback)."""
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdft: error: "), err
    return lines[0]


def _vit_file(path: Path, seed: int) -> str:
    from cdft_core.registry import get_registry

    torch.manual_seed(seed)
    model = get_registry().get("backbone", "test_vit").factory(pretrained=False, image_size=32).model
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(path))
    return str(path)


# -- cdft embed --backbone ---------------------------------------------------------------


def test_embed_backbone_takes_a_weights_file_offline(offline_empty_cache, image_dir, tmp_path):
    from cdft_core.inference.embed import read_embeddings

    weights = _vit_file(tmp_path / "vit.safetensors", seed=3)
    features = []
    for name in ("a", "b"):  # the same file twice: the same features (random init would differ)
        out = tmp_path / f"{name}.safetensors"
        code, _, err = invoke("embed", "--backbone", "test_vit", "--weights", weights, "--image-size", "32",
                              image_dir, "-o", str(out), "--num-workers", "0", "--device", "cpu")
        assert code == 0, err
        features.append(read_embeddings(str(out))[1])
    assert features[0].shape[0] > 0 and torch.equal(features[0], features[1])


def test_embed_checks_inputs_and_output_before_looking_for_weights(offline_empty_cache, image_dir, tmp_path):
    code, _, err = invoke("embed", "--backbone", "test_vit", str(tmp_path / "nonexist.png"),
                          "-o", str(tmp_path / "e.safetensors"))
    line = _error_line(code, err, 2)
    assert "nonexist.png" in line and "does not exist" in line and "pretrained" not in line
    code, _, err = invoke("embed", "--backbone", "test_vit", image_dir, "-o", str(tmp_path / "no" / "e.safetensors"))
    assert "folder" in _error_line(code, err, 2)


@pytest.mark.parametrize("extra, needle", [
    (("--backbone", "test_vit", "--no-pretrained"), "--no-pretrained and --weights contradict"),
    ((), "--weights applies to --backbone NAME"),
])
def test_embed_weights_misuse_is_a_usage_error(offline_empty_cache, image_dir, tmp_path, extra, needle):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code, _, err = invoke("embed", *extra, "--weights", str(weights), image_dir, "-o", str(tmp_path / "e.safetensors"))
    assert needle in _error_line(code, err, 2)


# -- seeds and YAML presets ---------------------------------------------------------------


def test_seed_beyond_what_numpy_takes_is_a_usage_error(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    args = quick_args(root, split, strategy="linear", epochs=1) + ["--output", str(tmp_path / "run")]
    code, _, err = invoke(*args, "--seed", "99999999999999999999999")
    assert _error_line(code, err, 2) == ("cdft: error: --seed must be an integer in [0, 4294967295], "
                                         "got 99999999999999999999999")
    preset = tmp_path / "p.yaml"
    preset.write_text("seed: 4294967296\n")
    code, _, err = invoke(*args, "--config", str(preset))
    assert "--seed must be an integer in [0, 4294967295], got 4294967296" in _error_line(code, err, 2)
    assert not (tmp_path / "run").exists()


def test_preset_with_a_repeated_key_is_refused(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 1\nepochs: 2\n")
    args = quick_args(root, split, strategy="linear", epochs=1) + ["--output", str(tmp_path / "run")]
    code, _, err = invoke(*args, "--config", str(preset))
    assert _error_line(code, err, 2) == (f"cdft: error: config file {str(preset)!r}: key 'epochs' appears twice "
                                         f"(lines 1 and 2); keep one")


def test_repeated_keys_are_refused_at_any_depth_and_merges_still_work(tmp_path):
    from cdft_core.yaml_files import load_yaml, yaml_value

    nested = tmp_path / "n.yaml"
    nested.write_text(textwrap.dedent("""\
        dataset_options:
          magnification: 40
          drop: []
          magnification: 100
    """))
    with pytest.raises(UsageError, match=r"key 'magnification' appears twice \(lines 2 and 4\); keep one$"):
        load_yaml(str(nested))
    with pytest.raises(UsageError, match=r"key 'a' appears twice \(line 1\)"):
        yaml_value("{a: 1, a: 2}", "--dataset-option x")
    merged = tmp_path / "m.yaml"
    merged.write_text("epochs: 1\nopts:\n  <<: {a: 1, b: 2}\n  a: 3\n")  # an override of a merge is no repeat
    assert load_yaml(str(merged)) == {"epochs": 1, "opts": {"a": 3, "b": 2}}


# -- weight files that are pickles ---------------------------------------------------------


class _Payload:
    def __reduce__(self):  # what a hostile file does: call a function when unpickled
        return (os.system, ("echo pwned",))


def test_pickle_with_objects_is_refused_without_advice_to_unpickle(tmp_path):
    from cdft_core.models.weights import read_state_dict

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": _Payload()}, path)
    with pytest.raises(CdftError) as raised:
        read_state_dict(path)
    assert str(raised.value) == (
        f"cannot read weights file {str(path)!r}: it is a pickle holding objects other than tensors, which cdft "
        f"never unpickles (loading it could run code); convert it to .safetensors on a machine where you trust the file"
    )


def test_protocol_4_pickle_fails_in_one_line_without_warnings(tmp_path, image_dir):
    from cdft_core.models.weights import read_state_dict

    path = tmp_path / "p4.pt"
    torch.save({"w": torch.zeros(1)}, path, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CdftError) as raised:
        warnings.simplefilter("always")
        read_state_dict(path)
    assert not caught, [str(w.message) for w in caught]
    message = str(raised.value)
    assert "weights_only" not in message and "arbitrary code" not in message and "\n" not in message
    assert "pickled with protocol 4 or higher" in message and message.endswith("pickle protocol 2 or 3")
    code, _, err = invoke("embed", "--backbone", "test_vit", "--weights", str(path), image_dir,
                          "-o", str(tmp_path / "e.safetensors"))
    assert "protocol 4" in _error_line(code, err, 1)


# -- the top-level error handler -----------------------------------------------------------


def test_debug_does_not_ask_to_rerun_with_debug(monkeypatch):
    from cdft_cli import main as main_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(main_module.cli, "main", broken)
    monkeypatch.delenv("CDFT_DEBUG", raising=False)
    code, _, err = invoke("list")
    assert code == 1 and err.strip() == "cdft: error: RuntimeError: boom (rerun with --debug for the traceback)"
    code, _, err = invoke("list", env={"CDFT_DEBUG": "1"})
    assert code == 1 and "Traceback" in err
    assert err.strip().splitlines()[-1] == "cdft: error: RuntimeError: boom"
