"""`cdft grid`: the paper's grid has 48 cells that reproduce the paper's presets;
`--print-commands` prints one line per cell that parses back to exactly that cell; a grid
file's mistakes are one-line usage errors; run locally, done cells are skipped, started ones
resumed, each job gets its own GPU, and a failed cell does not stop the others."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from helpers_engine import REPO, engine_data, invoke

from cdft_core.config import FIELD_NAMES, RunConfig, merge
from cdft_core.errors import UsageError
from cdft_core.experiments.grid import cell_args, cell_dir, load_grid, resume_args
from cdft_core.yaml_files import load_yaml

PAPER = REPO / "configs" / "grids" / "paper.yaml"
PAPER_BACKBONES = ["vit_base_patch16_clip_224.laion2b", "vit_base_patch16_clip_224.openai",
                   "vit_base_patch16_224.augreg_in21k", "convnext_base.clip_laion2b_augreg",
                   "open_clip:convnext_base.laion400m_s13b_b51k", "convnext_base.fb_in22k"]


def _config(values: dict) -> RunConfig:
    return merge(RunConfig(), {k: v for k, v in values.items() if k in FIELD_NAMES}, source="test")


def _write(tmp_path: Path, text: str, name: str = "grid.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- the paper's grid ---------------------------------------------------------------------
def test_the_paper_grid_lists_48_cells():
    code, out, err = invoke("grid", str(PAPER), "--dry-run")
    assert code == 0, err
    table, footer = out.split("\n\n")
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == list(range(48))
    assert {(r[2], r[3], r[4]) for r in rows} == {(d, b, s) for d in ("breakhis", "hcrf") for b in PAPER_BACKBONES
                                                  for s in ("linear", "full", "frt", "staged")}
    assert all(r[-1] == "new" for r in rows) and len({r[1] for r in rows}) == 48
    assert footer.startswith("48 cells (each a cross-validation; 0 excluded): 0 done, 0 started, 48 new")


def test_the_paper_grid_names_registered_backbones():
    from cdft_core.registry import get_registry

    registry = get_registry()
    for name in PAPER_BACKBONES:
        if not name.startswith("open_clip:"):  # that row needs the open_clip extra
            registry.get("backbone", name)


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_paper_grid_reproduces_each_preset(preset):
    wanted = _config(load_yaml(str(preset)))
    grid = load_grid(str(PAPER))
    cell = next(c for c in grid.cells if (c.labels["dataset"], c.labels["backbone"], c.labels["strategy"])
                == (wanted.dataset, wanted.backbone, wanted.strategy))
    ours = _config(cell.values).to_dict()
    for key in ("data_root", "split_file", "val_fold", "test_fold", "output"):  # the data's place; cv's folds
        ours.pop(key), wanted.to_dict().pop(key)
    assert ours == {k: v for k, v in wanted.to_dict().items() if k in ours}


def test_print_commands_gives_one_line_per_cell_that_runs_it_as_given():
    from cdft_cli.cv_cmd import cv_command
    from cdft_cli.run import config_overrides

    code, out, err = invoke("grid", str(PAPER), "--print-commands")
    assert code == 0, err
    lines = out.splitlines()
    grid = load_grid(str(PAPER))
    assert len(lines) == len(grid.cells) == 48
    for line, cell in zip(lines, grid.cells, strict=True):
        words = shlex.split(line)
        assert words[:2] == ["cdft", "cv"]
        params = cv_command.make_context("cv", words[2:]).params
        assert params["output"] == f"runs/paper/{cell.name}" and params["resume"] is None
        assert _config(config_overrides(params)) == _config({**cell.values, "output": cell_dir(grid, cell)})
    staged = shlex.split(lines[3])
    assert staged[staged.index("--strategy-option") + 1] == "lr_factor=0.1"
    code, out, _ = invoke("grid", str(PAPER), "--print-commands", "--cell", "47", "--output", "s3://bucket/paper")
    assert out.splitlines() == [shlex.join(["cdft", *cell_args(load_grid(str(PAPER), output="s3://bucket/paper"),
                                                                grid.cells[47])])]
    assert out.rstrip().endswith("--output s3://bucket/paper/hcrf-convnext_base.fb_in22k-staged")


# -- grid files ---------------------------------------------------------------------------
GRID = """
command: cv
rotations: 0,2
output: {out}
dataset: breakhis
data_root: /data
backbone: [test_vit, test_cnn]
seed: [1, 2]
lr: [1.0e-4, {{lr: 3.0e-4, weight_decay: 0.0}}]
exclude:
  - {{backbone: test_cnn, seed: [2]}}
"""


def test_cells_are_the_product_minus_exclusions_with_stable_names(tmp_path):
    grid = load_grid(_write(tmp_path, GRID.format(out=tmp_path / "g")))
    assert grid.axes == ["backbone", "seed", "lr"] and grid.excluded == 2 and grid.rotations == [0, 2]
    assert [c.name for c in grid.cells] == ["test_vit-seed1-lr0.0001", "test_vit-seed1-lr0.0003",
                                            "test_vit-seed2-lr0.0001", "test_vit-seed2-lr0.0003",
                                            "test_cnn-seed1-lr0.0001", "test_cnn-seed1-lr0.0003"]
    assert grid.cells[1].values == {"dataset": "breakhis", "data_root": "/data", "backbone": "test_vit", "seed": 1,
                                    "lr": 3e-4, "weight_decay": 0.0}
    assert cell_args(grid, grid.cells[1])[-4:] == ["--output", cell_dir(grid, grid.cells[1]), "--rotations", "0,2"]
    assert load_grid(_write(tmp_path, "backbone: [a]\n", "my-grid.yaml")).output == "runs/my-grid"


def test_a_cells_command_spells_values_as_cdft_run_reads_them(tmp_path):
    preset = str(REPO / "configs" / "hcrf-vit-frt.yaml")
    grid = load_grid(_write(tmp_path, "command: run\nbackbone: [a]\npretrained: 'false'\nlr: 1e-4\n"
                                      f"nproc_per_node: 2\nconfig: {preset}\n"))
    args = cell_args(grid, grid.cells[0])
    assert args[0] == "run" and "--no-pretrained" in args and args[args.index("--lr") + 1] == "0.0001"
    assert args[args.index("--nproc-per-node") + 1] == "2" and args[args.index("--config") + 1] == preset
    assert "--rotations" not in args


@pytest.mark.parametrize("command", ["cv", "run"])
def test_a_started_cell_resumes_with_its_launcher_options(tmp_path, command):
    grid = load_grid(_write(tmp_path, f"command: {command}\nbackbone: [a]\nlr: 1e-4\nnproc_per_node: 4\n"
                                      "nnodes: 2\nrdzv_endpoint: host:29500\n"))
    args = resume_args(grid, grid.cells[0])
    assert args[:3] == [command, "--resume", cell_dir(grid, grid.cells[0])]
    assert args[args.index("--nproc-per-node") + 1] == "4" and args[args.index("--nnodes") + 1] == "2"
    assert args[args.index("--rdzv-endpoint") + 1] == "host:29500"
    assert "--lr" not in args and "--backbone" not in args  # the rest is read back from the cell's config.yaml
    plain = load_grid(_write(tmp_path, "backbone: [a]\n", "plain.yaml"))
    assert resume_args(plain, plain.cells[0]) == ["cv", "--resume", cell_dir(plain, plain.cells[0])]


@pytest.mark.parametrize(("text", "needle"), [
    ("backbone: [a]\nlearning_rate: 1\n", "unknown key 'learning_rate'"),
    ("backbone: [a]\nbackbones: [b]\n", "did you mean 'backbone'?"),
    ("command: eval\n", "command must be cv or run"),
    ("backbone: [a]\nval_fold: 1\n", "val_fold is chosen by each rotation"),
    ("command: run\nrotations: [0]\n", "rotations apply to command: cv only"),
    ("backbone: []\n", "backbone lists no value"),
    ("dataset: [{data_root: /x}]\n", "must set dataset itself"),
    ("dataset: [{dataset: a, lr: [1, 2]}]\n", "is a list"),
    ("lr: 0.1\nstrategy: [{strategy: a, lr: 0.2}]\n", "lr is set twice"),
    ("backbone: [a, b]\nexclude:\n  - {backbone: c}\n", "matches no cell"),
    ("backbone: [a]\nexclude: [{bakbone: a}]\n", "unknown keys ['bakbone']"),
    ("backbone: [a, a]\n", "share the directory 'a'"),
    ("seed: [1, x]\n", "cell 1 (seedx): seed must be an integer"),
    ("backbone: [a]\nnproc_per_node: [two]\n", "--nproc-per-node expects a positive number"),
])
def test_grid_file_mistakes_are_one_line_usage_errors(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(UsageError, match=None) as raised:
        load_grid(path)
    assert needle in str(raised.value)
    code, _, err = invoke("grid", path, "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_jobs_give_each_cell_its_own_gpu(tmp_path):
    from cdft_core.experiments.grid_runner import device_slots

    cells = load_grid(_write(tmp_path, GRID.format(out=tmp_path / "g"))).cells
    assert device_slots(1, cells, gpus=["0", "1"]) == [None]  # one job keeps every GPU
    assert device_slots(2, cells, gpus=["4", "7", "9"]) == ["4", "7"]
    assert device_slots(3, cells, gpus=[]) == [None, None, None]  # no GPU: three processes
    with pytest.raises(UsageError, match="2 GPU"):
        device_slots(3, cells, gpus=["0", "1"])
    multi = load_grid(_write(tmp_path, "backbone: [a, b]\nnproc_per_node: 2\n", "m.yaml")).cells
    with pytest.raises(UsageError, match="use --jobs 1 for multi-GPU cells"):
        device_slots(2, multi, gpus=["0", "1"])


FAKE_CDFT = """
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--resume" if "--resume" in args else "--output") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"args": args, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
if "broken" in args:
    sys.exit("cdft: error: backbone 'broken' is unknown")
open(os.path.join(out, "cv_summary.json"), "w").write("{}")
"""


def test_local_runs_skip_done_cells_resume_started_ones_and_survive_failures(tmp_path, monkeypatch):
    from cdft_core.experiments.grid_runner import run_grid

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    out = tmp_path / "g"
    grid = load_grid(_write(tmp_path, "dataset: breakhis\nbackbone: [good, broken]\nseed: [1, 2]\n"
                                      f"output: {out}\n"))
    (out / "good-seed2").mkdir(parents=True)
    (out / "good-seed2" / "cv_summary.json").write_text("{}")  # done
    (out / "broken-seed2").mkdir()
    (out / "broken-seed2" / "config.yaml").write_text("{}")  # started
    script = tmp_path / "fake_cdft.py"
    script.write_text(FAKE_CDFT)
    said: list[str] = []
    outcomes = run_grid(grid, grid.cells, jobs=2, say=said.append, program=[sys.executable, str(script)])

    assert [(o.cell.name, o.status, o.exit_code) for o in outcomes] == [
        ("good-seed1", "done", 0), ("good-seed2", "skipped", None), ("broken-seed1", "failed", 1),
        ("broken-seed2", "done", 0)]  # a started cell resumes (its --resume line has no backbone)
    assert outcomes[2].error == "backbone 'broken' is unknown"
    calls = {name: [json.loads(line) for line in (out / name / "calls.jsonl").read_text().splitlines()]
             for name in ("good-seed1", "broken-seed1", "broken-seed2")}
    assert calls["broken-seed2"][0]["args"] == ["cv", "--resume", str(out / "broken-seed2")]
    assert calls["good-seed1"][0]["args"] == ["cv", *cell_args(grid, grid.cells[0])[1:]]
    assert {c[0]["gpu"] for c in calls.values()} <= {"3", "5"}
    log = (out / "broken-seed1.log").read_text()
    assert log.startswith("$ ") and "--backbone broken" in log and "cdft: error: backbone 'broken'" in log
    assert any("cell 1 good-seed2 is done: skipped" in line for line in said)


@pytest.mark.slow
def test_grid_runs_cells_keeps_going_after_a_failure_and_resumes(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    settings = {"command": "cv", "rotations": [0], "output": str(tmp_path / "grid"), "dataset": "breakhis",
                "data_root": root, "split_file": split, "backbone": ["test_vit", "no_such_backbone"],
                "pretrained": False, "image_size": 32, "strategy": "linear", "epochs": 1, "max_steps_per_epoch": 1,
                "batch_size": 8, "num_workers": 0, "device": "cpu", "tensorboard": False}
    path = _write(tmp_path, yaml.safe_dump(settings, sort_keys=False))
    code, out, err = invoke("grid", path, "--jobs", "2")
    assert code == 1, err
    assert "1 cell(s) ran, 0 were done already, 1 failed" in out
    assert "failed: cell 1 no_such_backbone" in out and "no_such_backbone" in err.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "grid" / "test_vit" / "cv_summary.json").read_text())
    assert [r["test_fold"] for r in summary["rotations"]] == [0]

    code, out, err = invoke("grid", path, "--cell", "0")
    assert code == 0 and "cell 0 test_vit is done: skipped" in err and "0 cell(s) ran, 1 were done already" in out


def test_an_unset_value_names_its_cell_no_key_and_passes_no_option(tmp_path):
    grid = load_grid(_write(tmp_path, "backbone: [a]\nema: [0.999, null]\n"))
    assert [c.name for c in grid.cells] == ["a-ema0.999", "a-no_ema"]
    assert "--ema" in cell_args(grid, grid.cells[0]) and "--ema" not in cell_args(grid, grid.cells[1])


def test_a_grid_of_too_many_cells_is_refused_before_any_is_built(tmp_path):
    """Three lists of 2000 values are 8e9 cells: listing them used to run out of memory."""
    values = "[" + ", ".join(str(i) for i in range(2000)) + "]"
    text = f"command: run\nbackbone: [a]\nseed: {values}\nepochs: {values.replace('[0, ', '[')}\nlog_every: {values.replace('[0, ', '[')}\n"
    with pytest.raises(UsageError, match=r"the grid has 7,992,002,000 cells \(1 x 2000 x 1999 x 1999\), more than 10,000"):
        load_grid(_write(tmp_path, text))
