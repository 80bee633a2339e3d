"""The comparison grid's bookkeeping of jobs and of its output folder, without training: job.json
files written by hand (a pid reused by another process, a SLURM state that cannot be read), and
two grid commands on one folder."""
import json
import os
from pathlib import Path

import pytest

from acm_d2.experiments import grid

REPO = Path(__file__).resolve().parents[1]
WIDE = str(REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm_wide.yaml")


def own_start_ticks() -> int:
    stat = Path("/proc/self/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def one_run(out):
    run = grid.plan(WIDE, out, [None], ["ACM"], 1, ["MODEL.DEVICE", "cpu"], {"ACM": []})[0]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "identity.json").write_text(json.dumps(run.identity))
    return run


def write_job(run, **fields):
    (run.run_dir / "job.json").write_text(json.dumps({"job_id": "4242", "folder": str(run.run_dir / "slurm"),
                                                      "opts": run.opts, "identity": run.identity, "submitted": 0.0,
                                                      **fields}))


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc")
def test_a_local_job_is_alive_only_with_its_pid_and_its_start_time(monkeypatch):
    """A job.json whose pid now belongs to another process counted as alive: the grid waited forever."""
    me = {"cluster": "local", "pid": os.getpid()}
    assert grid._job_alive({**me, "pid_start": own_start_ticks()}, None)
    assert not grid._job_alive({**me, "pid_start": own_start_ticks() - 1}, None)  # the pid of another process
    assert grid._job_alive(me, None)  # a job.json of an earlier version: the pid alone
    monkeypatch.setattr(grid, "_PROC", Path("/nonexistent/proc"))  # no /proc: the pid alone
    assert grid._job_alive({**me, "pid_start": own_start_ticks() - 1}, None)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc")
def test_a_local_job_whose_pid_was_reused_is_collected_as_ended(tmp_path):
    run = one_run(tmp_path)
    write_job(run, cluster="local", pid=os.getpid(), pid_start=own_start_ticks() - 1)
    outcome = grid.run_grid([run], WIDE, measure=lambda run: {}, slurm=grid.SlurmSettings(cluster="local"), wait=False)
    assert not outcome["running"]
    assert [f["failed"].split(" (")[0] for f in outcome["failed"]] == ["job 4242 ended without a final evaluation"]


def test_a_slurm_state_that_cannot_be_read_is_reported_not_waited_on_forever(tmp_path, monkeypatch):
    """Without sacct every SLURM state reads UNKNOWN, which counted as alive: the grid polled forever."""
    from acm_d2.engine import slurm

    polls = []

    class SlurmJob:  # submitit's, on a machine without sacct
        def __init__(self, folder, job_id):
            polls.append(job_id)
            if len(polls) > 200:
                raise RuntimeError("still polling an UNKNOWN state after 200 polls")
            self.state = "UNKNOWN"

    monkeypatch.setattr(slurm, "require_submitit", lambda: type("submitit", (), {"SlurmJob": SlurmJob}))
    monkeypatch.setattr(grid, "UNKNOWN_STATE_LIMIT_S", 0.05)
    run = one_run(tmp_path)
    write_job(run, cluster="slurm", pid=None)
    outcome = grid.run_grid([run], WIDE, measure=lambda run: {}, slurm=grid.SlurmSettings(), poll_s=0.01)
    assert not outcome["running"] and not outcome["finished"] and 2 <= len(polls) < 200
    message = outcome["failed"][0]["failed"]
    assert message.startswith("job 4242: its SLURM state could not be read for 0.05 s (sacct answers "
                              "UNKNOWN: is sacct missing on this machine")
    assert (run.run_dir / "job.json").is_file() and not (run.run_dir / "failed.json").exists()  # looked at again later


class GridRan(Exception):
    """Raised where the grid would start its runs."""


def hold_grid_lock(out, owner):
    """The lock of another grid command on ``out``: an flock on OUT/.acm_d2_grid.lock, its owner inside."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".acm_d2_grid.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(owner).encode())
    return fd


OWNER = {"pid": 31337, "host": "node7", "started": "2026-12-08T01:00:00",
         "command": "tools/compare_backbones.py --output-dir out"}


def test_a_second_grid_command_on_one_folder_is_refused_naming_the_first(tmp_path, monkeypatch):
    """Two grid commands on one output folder submitted or trained the same runs twice."""
    from acm_d2 import data
    from acm_d2.experiments.comparison import run_comparison

    def start(names):
        raise GridRan

    monkeypatch.setattr(data, "ensure_synthetic_dataset", start)
    out = tmp_path / "grid"
    fd = hold_grid_lock(out, OWNER)
    try:
        with pytest.raises(grid.GridInUseError, match=(
                rf"the grid output folder {out} is in use by another grid command: process 31337 on host node7, "
                r"started 2026-12-08T01:00:00 \(command: tools/compare_backbones.py --output-dir out\)")):
            run_comparison(WIDE, out, ["ACM"], 1, [])
        assert run_comparison(WIDE, out, ["ACM"], 1, [], dry_run=True)["commands"]  # a dry run takes no lock
    finally:
        os.close(fd)
    with pytest.raises(GridRan):  # the other command ended: this one runs
        run_comparison(WIDE, out, ["ACM"], 1, [])


def test_a_stale_grid_lock_of_a_killed_command_is_taken_over_and_released(tmp_path, monkeypatch, caplog):
    from acm_d2 import data
    from acm_d2.experiments.comparison import run_comparison

    held = []

    def start(names):
        held.append(json.loads((out / ".acm_d2_grid.lock").read_text()))
        raise GridRan

    monkeypatch.setattr(data, "ensure_synthetic_dataset", start)
    out = tmp_path / "grid"
    os.close(hold_grid_lock(out, OWNER))  # its process was killed: the file is left, unlocked
    with pytest.raises(GridRan):
        run_comparison(WIDE, out, ["ACM"], 1, [])
    assert held[0]["pid"] == os.getpid() and not (out / ".acm_d2_grid.lock").exists()
    assert "the grid output folder" in caplog.text and "has a stale lock of process 31337 on host node7" in caplog.text
