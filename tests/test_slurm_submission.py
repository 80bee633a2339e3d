"""tools/submit_slurm.py: the sbatch file submitit writes holds the allocation, the time limit,
the requeue signal and every passed-through option; without submitit the tool says how to
install it. (The job itself, stopped, requeued and resumed: tests/test_distributed.py.)"""
import os
import pickle
import subprocess
import sys

import pytest

from acm_d2.engine.slurm import TrainingJob, parse_slurm_options
from train_net_runs import REPO

SUBMIT = REPO / "tools" / "submit_slurm.py"
FAKE_SBATCH = """#!/bin/sh
cp "$1" "{record}"
echo "Submitted batch job 4242"
"""


def test_parse_slurm_options():
    assert parse_slurm_options(["account=abc", "qos=high", "exclusive", "--constraint=volta32gb", "comment=a=b"]) == {
        "account": "abc", "qos": "high", "exclusive": True, "constraint": "volta32gb", "comment": "a=b",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_slurm_options(["=abc"])


def test_requeued_job_resumes():
    job = TrainingJob("tools/train_net.py", ["--config-file", "c.yaml", "OUTPUT_DIR", "out"])
    pytest.importorskip("submitit")
    again = job.checkpoint().function
    assert again.args == ["--resume", "--config-file", "c.yaml", "OUTPUT_DIR", "out"]  # before the KEY VALUE options
    assert again.checkpoint().function.args == again.args  # --resume once
    assert pickle.loads(pickle.dumps(again)).args == again.args


def test_submit_writes_the_sbatch_options(tmp_path):
    pytest.importorskip("submitit")
    bin_dir, record = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(record=record)), ("srun", "#!/bin/sh\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO))
    command = [
        sys.executable, str(SUBMIT), "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "4320",
        "--mem-gb", "400", "--slurm", "account=myproject", "--slurm", "exclusive", "--setup", "module load cuda",
        "--job-dir", str(tmp_path / "jobs"), "--", "--config-file", "configs/x.yaml", "OUTPUT_DIR", "/shared/out",
    ]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitted job 4242" in proc.stdout
    sbatch = record.read_text().splitlines()
    for line in ("--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--time=4320",
                 "--mem=400GB", "--signal=USR2@120", "--account=myproject", "--exclusive"):
        assert f"#SBATCH {line}" in sbatch, (line, sbatch)
    assert "module load cuda" in sbatch
    pickled = list((tmp_path / "jobs").glob("*_submitted.pkl"))
    assert len(pickled) == 1
    job = pickle.loads(pickled[0].read_bytes()).function
    assert isinstance(job, TrainingJob) and job.script == str(REPO / "tools" / "train_net.py")
    assert job.args == ["--config-file", "configs/x.yaml", "OUTPUT_DIR", "/shared/out"]


def test_without_submitit_the_tool_says_how_to_install_it(tmp_path):
    fake = tmp_path / "no_submitit"
    (fake / "submitit").mkdir(parents=True)
    (fake / "submitit" / "__init__.py").write_text("raise ImportError(\"No module named 'submitit'\")\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, str(SUBMIT), "--", "--config-file", "x.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "needs the optional package submitit: pip install submitit" in proc.stderr


def test_local_job_is_signalled_before_its_time_limit(tmp_path, monkeypatch):
    """--cluster local: submitit's local executor gets the time limit and the signal delay, so it
    sends SIGUSR2 --signal-delay seconds before --time, as SLURM does."""
    submitit = pytest.importorskip("submitit")
    from acm_d2.engine.slurm import submit_training

    submitted = {}

    class Submitted(Exception):
        pass

    def record(executor, job):
        submitted.update(executor.parameters, job=job, max_num_timeout=executor.max_num_timeout)
        raise Submitted  # stop before a process is started

    monkeypatch.setattr(submitit.LocalExecutor, "submit", record)
    with pytest.raises(Submitted):
        submit_training("tools/train_net.py", ["--config-file", "x.yaml"], str(tmp_path), gpus_per_node=0,
                        tasks_per_node=2, time_min=3, signal_delay_s=60, max_requeues=4, cluster="local")
    assert (submitted["timeout_min"], submitted["signal_delay_s"], submitted["tasks_per_node"]) == (3, 60, 2)
    assert submitted["max_num_timeout"] == 4 and submitted["job"].args == ["--config-file", "x.yaml"]
