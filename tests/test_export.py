"""``cdft export`` on a tiny trained CDTM run: ONNX and .pt2 files with a dynamic batch,
their metadata (preprocessing and classes), the numerical check against PyTorch, and a
failed check or a missing extra leaving no file behind."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch
from helpers_engine import invoke, staged_run

pytest.importorskip("onnxruntime", reason="needs the export extra: pip install 'cdft[export]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return staged_run(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(run):
    from cdft_core.inference.model_loading import load_trained

    return load_trained(str(run), device="cpu")


def _batch(trained, n: int) -> torch.Tensor:
    shape = tuple(trained[2]["input_size"])
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(7))


def _check_metadata(meta: dict, trained) -> None:
    model, classes, data_config, _ = trained
    assert meta["classes"] == classes
    assert meta["input_size"] == list(data_config["input_size"])
    assert meta["mean"] == pytest.approx(list(data_config["mean"]))
    assert meta["std"] == pytest.approx(list(data_config["std"]))
    assert meta["interpolation"] == data_config["interpolation"]
    assert meta["adapter"] == "cdtm"


def test_onnx_export_of_a_cdtm_run_is_checked_and_takes_any_batch(run, trained, tmp_path):
    import onnxruntime

    from cdft_core.inference.export import read_onnx_metadata

    out = tmp_path / "model.onnx"
    umask = os.umask(0o022)
    try:
        code, stdout, stderr = invoke("export", str(run), "-o", str(out))
    finally:
        os.umask(umask)
    assert code == 0, stderr
    assert "max |difference| vs PyTorch" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]  # no temporary left
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # as any new file under the umask, not mkstemp's 0600
    meta = read_onnx_metadata(str(out))
    _check_metadata(meta, trained)
    assert json.loads((tmp_path / "model.onnx.json").read_text()) == meta

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    x = _batch(trained, 5)  # a batch size neither traced nor checked
    got = session.run(None, {meta["input"]: x.numpy()})[0]
    with torch.no_grad():
        expected = trained[0](x).numpy()
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-4


def test_pt2_export_of_a_cdtm_run_round_trips_through_torch_export_load(run, trained, tmp_path):
    from cdft_core.inference.export import read_pt2_metadata

    out = tmp_path / "model.bin"
    code, stdout, stderr = invoke("export", str(run), "--format", "pt2", "-o", str(out), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["format"] == "pt2" and result["max_difference"] <= 1e-4
    assert result["checked_batches"] == [1, 3]
    _check_metadata(read_pt2_metadata(str(out)), trained)

    module = torch.export.load(str(out)).module()
    x = _batch(trained, 4)
    with torch.no_grad():
        assert (module(x) - trained[0](x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_convnext_model_exports_too(fmt, tmp_path):
    from cdft_core.inference.export import export_metadata, export_model
    from cdft_core.models.model import build_model

    model = build_model("test_convnext", "none", 3, pretrained=False, image_size=64).eval()
    info = export_metadata(model, ["a", "b", "c"], model.data_config, {})
    result = export_model(model, str(tmp_path / f"m.{fmt}"), fmt, info)
    assert result.max_difference <= 1e-4
    assert (tmp_path / f"m.{fmt}").is_file()


def test_a_failed_check_writes_nothing_and_names_the_difference(run, tmp_path, monkeypatch):
    import cdft_core.inference.export as export

    monkeypatch.setattr(export, "max_difference", lambda *a, **k: 0.25)
    out = tmp_path / "model.onnx"
    code, stdout, stderr = invoke("export", str(run), "-o", str(out))
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1
    assert "differs from the PyTorch model by up to 0.25" in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_extra_is_one_line_and_usage_errors_exit_2(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, stderr = invoke("export", str(run), "-o", str(tmp_path / "m.onnx"))
    assert code == 1
    assert stderr.strip() == "cdft: error: cdft export needs the export extra: pip install 'cdft[export]'"
    monkeypatch.undo()
    code, _, stderr = invoke("export", str(run), "-o", str(tmp_path / "m.tflite"))
    assert code == 2 and "--format onnx" in stderr
    code, _, stderr = invoke("export", str(run), "-o", str(tmp_path / "missing" / "m.onnx"))
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = invoke("export", str(run), "-o", "memory://exports/m.onnx")  # refused before the model loads
    assert code == 2 and stderr.strip() == ("cdft: error: cannot write 'memory://exports/m.onnx': cdft export writes a "
                                            "local file; give a local path (-o model.onnx) and copy the file and its "
                                            ".json where they should go")
    assert list(tmp_path.iterdir()) == []


def test_metadata_records_the_interpolation_training_used(trained):
    from cdft_core.inference.export import export_metadata

    model, classes, data_config, metadata = trained
    for raw, used in (("lanczos", "bicubic"), ("hamming", "bicubic"), ("random", "bilinear"), ("bicubic", "bicubic")):
        info = export_metadata(model, classes, dict(data_config, interpolation=raw), metadata)
        assert info["interpolation"] == used and info["antialias"] is True
