"""tools/compare_backbones.py: a tiny grid through the local path and through submitit's local
executor for the SLURM path (interrupted and resumed), failed runs, the README's dry run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from acm_d2.experiments.comparison import inference_seconds_per_image
from acm_d2.experiments.grid import BACKBONES, backbone_overrides
from acm_d2.experiments.paper import TABLE6, table6_row

REPO = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(REPO / "tools" / "compare_backbones.py")]
WIDE = str(REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm_wide.yaml")
TINY = ["--quick", "--seeds", "2", "--variants", "NL,ACM", "--device", "cpu"]  # a peer and ACM


def compare(out, *args, check=True, cache=None):
    env = dict(os.environ, ACM_D2_DATA_CACHE=str(cache or Path(out).parent / "cache"))
    done = subprocess.run(TOOL + TINY + ["--output-dir", str(out), *args, "SOLVER.MAX_ITER", "2"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def attempts(out):
    return sorted(str(p.parent.relative_to(out)) for p in Path(out).glob("**/attempts.jsonl")
                  for _ in p.read_text().splitlines())


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    compare(out, "--jobs", "2")
    return out


@pytest.mark.slow
def test_local_grid_writes_the_report_and_reuses_finished_runs(local_grid):
    out = local_grid
    md = (out / "comparison.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    # AP box, AP mask, label accuracy, |cos(K, Q)|, cost: a header and one row per variant each
    assert rows == ["variant", "NL", "ACM"] * 5
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    for col in ("AP", "AP50", "AP75", "context", "local", "lesion_emergency", "square"):
        assert f" {col} |" in header
    assert "| variant | parameters (M) | context parameters (M) | GFLOPs | s / image |" in md
    assert "Table 6" not in md  # not a COCO val grid
    stored = json.loads((out / "comparison.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in stored["runs"]) == [("ACM", 0), ("ACM", 1), ("NL", 0), ("NL", 1)]
    costs = stored["costs"]
    assert costs["ACM"]["context_parameters_m"] > 0 and costs["NL"]["context_parameters_m"] > 0
    assert costs["ACM"]["parameters_m"] - costs["ACM"]["context_parameters_m"] == pytest.approx(
        costs["NL"]["parameters_m"] - costs["NL"]["context_parameters_m"])  # the same detector around them
    assert costs["ACM"]["gflops"] > 0 and costs["NL"]["gflops"] > 0
    assert all(r["metrics"]["time/inference_s_per_image"] > 0 for r in stored["runs"])
    assert all(0 <= r["metrics"]["context/label_acc"] <= 100 for r in stored["runs"])
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert attempts(out) == ["ACM/seed0", "ACM/seed1", "NL/seed0", "NL/seed1"]
    again = compare(out)
    assert again.stderr.count("Reusing") == 4 and len(attempts(out)) == 4


@pytest.mark.slow
def test_slurm_path_interrupted_and_resumed_trains_each_run_once(local_grid, tmp_path):
    """Seed 0 of the grid (both modules) as jobs of submitit's local executor."""
    out = tmp_path / "slurm"
    slurm = ["--slurm", "--cluster", "local", "--gpus-per-node", "0", "--poll", "1", "--seeds", "1"]
    first = compare(out, *slurm, "--no-wait")  # submits every job and leaves (an interrupted call)
    assert "Reusing" not in first.stderr
    jobs = {json.loads(p.read_text())["job_id"] for p in out.glob("**/job.json")}
    assert len(jobs) == 2
    compare(out, *slurm)  # a second call submits nothing new and collects every job
    assert attempts(out) == ["ACM/seed0", "NL/seed0"]
    assert {json.loads(p.read_text())["job_id"] for p in out.glob("**/job.json")} == jobs
    # the same trainings as the local path: the same AP to the last digit (|cos(K, Q)| is
    # measured again from the weights, to float rounding)
    local = {(r["variant"], r["seed"]): r["metrics"] for r in json.loads((local_grid / "comparison.json").read_text())["runs"]}
    runs = json.loads((out / "comparison.json").read_text())["runs"]
    assert sorted(r["variant"] for r in runs) == ["ACM", "NL"]
    for run in runs:
        expected = local[(run["variant"], run["seed"])]
        aps = [k for k in expected if k.startswith(("bbox/", "segm/"))]
        assert {k: run["metrics"][k] for k in aps} == pytest.approx({k: expected[k] for k in aps}, rel=0, abs=0, nan_ok=True)
        if "kq/mean_abs_cosine" in expected:
            assert run["metrics"]["kq/mean_abs_cosine"] == pytest.approx(expected["kq/mean_abs_cosine"], rel=1e-5)


def test_failed_runs_are_listed_with_their_log_and_retried_on_request(tmp_path, monkeypatch):
    """A run whose training fails (here: train_net exits with an error after logging it)."""
    from acm_d2.experiments import grid
    from acm_d2.experiments.report import write_markdown

    def failing_train_net(config_file, opts, output_dir, threads=None, log_path=None):
        Path(log_path).write_text("iter 20: loss_cls 3.1\nFloatingPointError: Loss became infinite or NaN at iteration=21!\n")
        raise RuntimeError(f"tools/train_net.py failed with exit code 1 (see {log_path})")

    monkeypatch.setattr(grid, "run_train_net", failing_train_net)
    runs = grid.plan(WIDE, tmp_path, [None], ["ACM"], 1, ["MODEL.DEVICE", "cpu"], {"ACM": ["MODEL.ACM.MODULE", "ACM"]})
    outcome = grid.run_grid(runs, WIDE, measure=lambda run: {})
    assert [f["variant"] for f in outcome["failed"]] == ["ACM"] and not outcome["finished"]
    assert "Loss became infinite or NaN at iteration=21" in outcome["failed"][0]["log_tail"]
    md = tmp_path / "comparison.md"
    write_markdown(md, {(None, "ACM"): {}}, [], [], "cmd", 1, [], [], outcome["failed"])
    text = md.read_text()
    assert "Failed runs (left out of the means; `--retry-failed` trains them again, except a job whose SLURM state could not be read" in text
    assert "- ACM seed 0: tools/train_net.py failed with exit code 1" in text and "Loss became infinite" in text
    assert attempts(tmp_path) == ["ACM/seed0"]
    assert grid.run_grid(runs, WIDE, measure=lambda run: {})["failed"]  # listed again, not retrained
    assert attempts(tmp_path) == ["ACM/seed0"]
    grid.run_grid(runs, WIDE, measure=lambda run: {}, retry_failed=True)
    assert attempts(tmp_path) == ["ACM/seed0", "ACM/seed0"]


def test_differences_to_plain_mark_those_beyond_twice_the_seed_std(tmp_path):
    """The report's differences table: mean minus plain's mean, bold beyond 2 x max(std, plain's std)."""
    from acm_d2.experiments.report import difference_to_baseline, write_markdown

    table = {(None, "plain"): {"box AP": (60.0, 2.0, 5), "mask AP": (62.0, 1.0, 5)},
             (None, "SE"): {"box AP": (63.5, 1.0, 5), "mask AP": (61.0, 0.5, 5)},   # +3.5 < 2 x 2.0
             (None, "ACM"): {"box AP": (64.5, 1.0, 5), "mask AP": (68.0, 3.5, 5)}}  # +4.5 > 4.0; +6.0 < 7.0
    assert difference_to_baseline(table, (None, "SE"), "box AP") == (3.5, False)
    assert difference_to_baseline(table, (None, "ACM"), "box AP") == (4.5, True)
    assert difference_to_baseline(table, (None, "ACM"), "mask AP") == (6.0, False)
    assert difference_to_baseline(table, (None, "plain"), "box AP") is None
    assert difference_to_baseline({(None, "ACM"): table[(None, "ACM")]}, (None, "ACM"), "box AP") is None
    one_seed = {row: {c: (m, 0.0, 1) for c, (m, _, _) in cells.items()} for row, cells in table.items()}
    assert difference_to_baseline(one_seed, (None, "ACM"), "box AP") == (4.5, False)
    md = tmp_path / "comparison.md"
    write_markdown(md, table, ["box AP", "mask AP"], list(table), "cmd", 5, [], [])
    section = md.read_text().split("### Difference to plain (same backbone)")[1]
    assert "| variant | box AP | mask AP |" in section
    assert "| SE | +3.50 | -1.00 |" in section and "| ACM | **+4.50** | +6.00 |" in section
    assert "| plain |" not in section


def test_readme_table6_command_dry_run():
    """The README's one command for Table 6 on a cluster, and the jobs its --dry-run prints."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("# The paper's Table 6 on a cluster"):]
    command = block[block.index("python tools/compare_backbones.py"):block.index("\n```")]
    args = [a for a in command.replace("\\\n", " ").split()][2:]
    done = subprocess.run(TOOL + args + ["--dry-run"], cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 15  # 3 backbones x 5 variants x 1 seed
    documented = re.search(r"prints one line per job, the first:\n\n```\n(.*?)\n```", readme, re.S).group(1)
    assert lines[0] == documented.replace("\\\n", "").replace("  ", " ").strip()
    assert all(line.startswith("job: 1 node(s) x 8 GPU(s), 4320 min, partition gpu: python tools/train_net.py --resume")
               for line in lines)
    assert sum("MODEL.RESNETS.NUM_GROUPS 32 MODEL.RESNETS.WIDTH_PER_GROUP 8" in line for line in lines) == 5
    assert sum("MODEL.ACM.MODULE NL" in line for line in lines) == 3


def test_backbone_overrides_follow_the_model_zoo():
    assert backbone_overrides("R_101", "detectron2://ImageNetPretrained/MSRA/R-50.pkl")[-4:] == [
        "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-101.pkl", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"]
    assert "MODEL.WEIGHTS" not in backbone_overrides("R_50", "")  # from scratch stays from scratch
    with pytest.raises(ValueError, match=re.escape("Detectron2's model zoo has none for R_18")):
        backbone_overrides("R_18", "detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    with pytest.raises(ValueError, match=re.escape(f"unknown backbone 'R_200'; choose from {list(BACKBONES)}")):
        backbone_overrides("R_200", "")
    assert len(TABLE6) == 15 and table6_row("R_50", "ACM")["bbox/AP"] == 39.94 and table6_row("R_50", "GC") is None


def test_inference_time_is_read_from_detectron2s_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("[d2.evaluation.evaluator]: Total inference time: 0:00:09.8 (0.066 s / iter per device, on 1 devices)\n"
                   "[d2.evaluation.evaluator]: Total inference pure compute time: 0:00:07 (0.048 s / iter per device, on 1 devices)\n")
    assert inference_seconds_per_image(log) == 0.048
    assert inference_seconds_per_image(tmp_path / "missing.txt") is None



def fake_train_net(trained):
    """A stand-in for tools/train_net.py: writes model_final.pth and one evaluation whose box AP
    is the config's SOLVER.BASE_LR x 1000 (so a result shows which config produced it)."""
    from acm_d2 import get_acm_cfg

    def train(config_file, opts, output_dir, threads=None, log_path=None):
        settings = dict(zip(opts[1::2], opts[2::2]))  # opts[0] is "--resume"
        trained.append((Path(output_dir).name, settings.get("SOLVER.BASE_LR")))
        Path(log_path).write_text("trained\n")
        (Path(output_dir) / "model_final.pth").write_bytes(b"")
        ap = get_acm_cfg(config_file, opts[1:]).SOLVER.BASE_LR * 1000
        (Path(output_dir) / "metrics.json").write_text(json.dumps({"iteration": 1, "bbox/AP": ap}) + "\n")
        return {}

    return train


def test_a_run_of_another_config_is_trained_again_in_a_fresh_folder(tmp_path, monkeypatch):
    """A finished run is reused only when its config's content and the code are the same; a run
    of another config (another override, or the same file edited) is moved aside, never relabelled."""
    from acm_d2.experiments import grid

    trained = []
    monkeypatch.setattr(grid, "run_train_net", fake_train_net(trained))
    config = tmp_path / "mine.yaml"
    config.write_text(f"_BASE_: {WIDE}\nSOLVER:\n  BASE_LR: 0.02\n")
    out = tmp_path / "grid"

    def grid_of(*opts):
        runs = grid.plan(str(config), out, [None], ["ACM"], 1, ["MODEL.DEVICE", "cpu", *opts], {"ACM": []})
        return runs, grid.run_grid(runs, str(config), measure=lambda run: {})

    runs, first = grid_of()
    assert first["finished"][0]["metrics"]["bbox/AP"] == pytest.approx(20.0)
    identity = first["finished"][0]["identity"]
    assert identity["acm_d2"] == __import__("acm_d2").__version__ and len(identity["config_sha256"]) == 64
    _, again = grid_of()  # the same: reused
    assert len(trained) == 1 and again["finished"][0]["identity"] == identity
    _, changed = grid_of("SOLVER.BASE_LR", "0.001")  # another override: trained again, from scratch
    assert len(trained) == 2 and changed["finished"][0]["metrics"]["bbox/AP"] == pytest.approx(1.0)
    assert changed["finished"][0]["identity"]["config_sha256"] != identity["config_sha256"]
    aside = sorted(p.name for p in (out / "ACM").iterdir())
    assert aside[0] == "seed0" and len(aside) == 2 and aside[1].startswith("seed0.superseded-")
    assert json.loads((out / "ACM" / aside[1] / "result.json").read_text())["identity"] == identity  # kept
    config.write_text(f"_BASE_: {WIDE}\nSOLVER:\n  BASE_LR: 0.005\n")  # the same file, edited
    _, same = grid_of("SOLVER.BASE_LR", "0.001")  # the override wins: the same resolved config, reused
    assert len(trained) == 2 and same["finished"][0]["metrics"]["bbox/AP"] == pytest.approx(1.0)
    _, edited = grid_of()  # the file's new LR: trained again
    assert len(trained) == 3 and edited["finished"][0]["metrics"]["bbox/AP"] == pytest.approx(5.0)
    assert len(list((out / "ACM").iterdir())) == 3
    stored = json.loads((out / "ACM" / "seed0" / "identity.json").read_text())
    assert stored == edited["finished"][0]["identity"] and stored["config_sha256"] not in (
        identity["config_sha256"], changed["finished"][0]["identity"]["config_sha256"])


def test_a_failed_run_of_another_config_starts_afresh(tmp_path, monkeypatch):
    from acm_d2.experiments import grid

    def failing(config_file, opts, output_dir, threads=None, log_path=None):
        Path(log_path).write_text("ResumeConfigError: MODEL.ACM.GROUPS changed\n")
        (Path(output_dir) / "last_checkpoint").write_text("model_0000009.pth")
        raise RuntimeError("tools/train_net.py failed with exit code 1")

    monkeypatch.setattr(grid, "run_train_net", failing)
    runs = grid.plan(WIDE, tmp_path, [None], ["ACM"], 1, ["MODEL.DEVICE", "cpu"], {"ACM": []})
    assert grid.run_grid(runs, WIDE, measure=lambda run: {})["failed"]
    trained = []
    monkeypatch.setattr(grid, "run_train_net", fake_train_net(trained))
    changed = grid.plan(WIDE, tmp_path, [None], ["ACM"], 1, ["MODEL.DEVICE", "cpu", "MODEL.ACM.GROUPS", "8"], {"ACM": []})
    outcome = grid.run_grid(changed, WIDE, measure=lambda run: {}, retry_failed=True)
    assert outcome["finished"] and not outcome["failed"]
    assert not (tmp_path / "ACM" / "seed0" / "last_checkpoint").exists()  # a fresh folder, not a resume
    assert any(p.name.startswith("seed0.superseded-") for p in (tmp_path / "ACM").iterdir())


@pytest.mark.parametrize("variants, seeds, backbones, expected", [
    (["plain", "ACM", "plain"], 1, [None], "--variants names plain more than once"),
    (["plain"], 0, [None], r"--seeds 0: expected the number of seeds, at least 1"),
    (["plain"], 1, ["R_50", "R_50"], "--backbones names R_50 more than once"),
])
def test_an_empty_or_repeated_grid_is_refused_naming_the_option(tmp_path, variants, seeds, backbones, expected):
    """--seeds 0 wrote an empty table with exit code 0; a repeated variant trained one folder twice
    (tools/compare_backbones.py prints these errors as "error: ..." and exits non-zero)."""
    from acm_d2.experiments.comparison import run_comparison

    with pytest.raises(ValueError, match=expected):
        run_comparison(WIDE, tmp_path / "grid", variants, seeds, [], backbones=backbones)
    assert not (tmp_path / "grid").exists()
