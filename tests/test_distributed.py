"""Distributed training on the CPU (gloo).

tools/train_net.py --num-gpus 2: two processes train a tiny Mask R-CNN + ACM with naiveSyncBN and
find_unused_parameters off; both ranks finish with identical weights, and loss_acm_orth is
averaged over the ranks like Detectron2's other losses. The same training started by torchrun,
as two machines on one host, and as a SLURM job (submitit's local executor) that is stopped by
its signal, requeued and resumed, ends with the same weights; a failing worker names its rank."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
from detectron2.layers import get_norm
from torch import nn

from acm_d2.engine import check_distributed_setup
from acm_d2.engine import launcher as launch_module
from acm_d2.engine.rendezvous import GroupFormationError
from train_net_runs import CONFIG, REPO, load_model_weights, read_metrics, tiny_opts, write_tiny_coco

# Runs tools/train_net.py's own command line (argument_parser, launch, setup, main, Trainer)
# with one probe hook added to its Trainer, in every process (spawned workers re-run this
# file's top level, so the patched Trainer is theirs too).
DRIVER = textwrap.dedent(
    """
    import json, os
    import torch
    from acm_d2 import train_net
    from detectron2.engine import HookBase
    from detectron2.utils import comm


    class Probe(HookBase):
        def before_train(self):
            self.values = []
            model = getattr(self.trainer.model, "module", self.trainer.model)
            model.register_forward_hook(self.record)

        def record(self, model, inputs, outputs):
            if model.training and isinstance(outputs, dict):
                self.values.append(outputs["loss_acm_orth"].item())

        def after_train(self):
            out = self.trainer.cfg.OUTPUT_DIR
            rank = comm.get_rank()
            model = getattr(self.trainer.model, "module", self.trainer.model)
            torch.save(model.state_dict(), os.path.join(out, f"weights_rank{{rank}}.pth"))
            reduced = None
            if rank == 0:
                reduced = [v for v, _ in self.trainer.storage.history("loss_acm_orth").values()]
            record = {{"rank": rank, "world": comm.get_world_size(), "local": self.values, "reduced": reduced,
                       "ddp": type(self.trainer.model).__name__}}
            with open(os.path.join(out, f"probe_rank{{rank}}.json"), "w") as f:
                json.dump(record, f)


    class ProbeTrainer(train_net.Trainer):
        def build_hooks(self):
            return super().build_hooks() + [Probe()]


    train_net.Trainer = ProbeTrainer

    if __name__ == "__main__":
        train_net.invoke_main()
    """
)


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync(tmp_path):
    json_file, image_root = write_tiny_coco(tmp_path / "data", num_images=8)
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tools=str(REPO / "tools")))
    opts = tiny_opts(out, max_iter=3) + [
        "SOLVER.IMS_PER_BATCH", "4",  # 2 images per process
        "MODEL.RESNETS.NORM", "naiveSyncBN",  # SyncBN that works with gloo on the CPU
    ]
    command = [
        sys.executable, str(driver), "--num-gpus", "2", "--dist-url", "auto",
        "--config-file", str(CONFIG), "--register-coco", "tiny", json_file, image_root, *opts,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    probes = [json.loads((out / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["rank"] for p in probes] == [0, 1] and all(p["world"] == 2 for p in probes)
    assert all(p["ddp"] == "DistributedDataParallel" for p in probes)
    assert all(len(p["local"]) == 3 for p in probes)  # 3 iterations: no unused-parameter error

    # identical weights on both ranks, also the synchronised BN statistics
    w0, w1 = torch.load(out / "weights_rank0.pth", weights_only=True), torch.load(out / "weights_rank1.pth", weights_only=True)
    assert w0.keys() == w1.keys()
    assert [k for k in w0 if not torch.equal(w0[k], w1[k])] == []
    final = load_model_weights(out / "model_final.pth")
    assert all(torch.equal(final[k], w0[k]) for k in final)

    # loss_acm_orth is averaged over the ranks, as Detectron2 does for every loss
    local0, local1 = probes[0]["local"], probes[1]["local"]
    assert local0 != local1  # the ranks see different images
    expected = [(a + b) / 2 for a, b in zip(local0, local1)]
    assert probes[0]["reduced"] == pytest.approx(expected, rel=1e-6)
    # metrics.json: Detectron2's JSONWriter writes the median of the last 20 reduced values
    final_metrics = [m for m in read_metrics(out) if "loss_acm_orth" in m][-1]
    assert final_metrics["loss_acm_orth"] == pytest.approx(float(np.median(expected)), rel=1e-6)


def test_launch_hides_gpus_for_cpu_training(monkeypatch):
    seen = []
    monkeypatch.setattr(launch_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        launch_module, "detectron2_launch", lambda *a, **k: seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    launch_module.launch(print, 2, device="cpu")
    launch_module.launch(print, 2, device="cuda")
    launch_module.launch(print, 1, device="cpu")
    assert seen == ["", "0,1", "0,1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_syncbn_on_cpu_with_several_processes_is_a_clear_error(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), get_norm("SyncBN", 4))
    check_distributed_setup(model)  # one process: fine (SyncBatchNorm acts as BatchNorm)
    monkeypatch.setattr("detectron2.utils.comm.get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="naiveSyncBN") as info:
        check_distributed_setup(model)
    assert "SyncBatchNorm" in str(info.value) and "CUDA" in str(info.value)
    check_distributed_setup(nn.Sequential(nn.Conv2d(3, 4, 1), get_norm("naiveSyncBN", 4)))


# ------------------------------------------- torchrun, two machines, SLURM (submitit), failures
# Every run below trains the same tiny Mask R-CNN + ACM on the built-in acm_synthetic_tiny_train
# with 2 CPU processes (gloo), so all of them must end with the same weights, bit for bit.
CLUSTER_DRIVER = textwrap.dedent(
    """
    import json, os, time
    import torch
    from acm_d2 import train_net
    from detectron2.engine import HookBase
    from detectron2.utils import comm
    from acm_d2.engine.preemption import stop_requested


    class Probe(HookBase):
        def before_train(self):
            out, rank = self.trainer.cfg.OUTPUT_DIR, comm.get_rank()
            record = {{"rank": rank, "world": comm.get_world_size(), "pid": os.getpid(), "ppid": os.getppid(),
                       "start_iter": self.trainer.start_iter, "ddp": type(self.trainer.model).__name__,
                       "backend": torch.distributed.get_backend()}}
            with open(os.path.join(out, f"runs_rank{{rank}}.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\\n")

        def before_step(self):  # ACM_TEST_WAIT_AT=ITER: rank 1 of a fresh run waits there for its stop signal
            wait_at = int(os.environ.get("ACM_TEST_WAIT_AT", "-1"))
            if comm.get_rank() != 1 or self.trainer.iter != wait_at or self.trainer.start_iter != 0:
                return
            with open(os.path.join(self.trainer.cfg.OUTPUT_DIR, "waiting_pid"), "w") as f:
                f.write(str(os.getpid()))
            deadline = time.time() + 120
            while stop_requested() is None:
                assert time.time() < deadline, "no stop signal within 120 s"
                time.sleep(0.01)

        def after_train(self):
            if self.trainer.iter + 1 >= self.trainer.max_iter:  # finished (not stopped)
                model = getattr(self.trainer.model, "module", self.trainer.model)
                path = os.path.join(self.trainer.cfg.OUTPUT_DIR, f"weights_rank{{comm.get_rank()}}.pth")
                torch.save(model.state_dict(), path)


    class ProbeTrainer(train_net.Trainer):
        def build_hooks(self):
            return super().build_hooks() + [Probe()]


    train_net.Trainer = ProbeTrainer

    if __name__ == "__main__":
        train_net.invoke_main()
    """
)
CLUSTER_MAX_ITER = 6


def cluster_opts(output_dir):
    """tiny_opts on acm_synthetic_tiny_train (4 classes), 2 images per process, naiveSyncBN."""
    return tiny_opts(output_dir, max_iter=CLUSTER_MAX_ITER) + [
        "DATASETS.TRAIN", "('acm_synthetic_tiny_train',)",
        "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "4",
        "SOLVER.IMS_PER_BATCH", "4",
        "MODEL.RESNETS.NORM", "naiveSyncBN",
    ]


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory):
    """The environment of the training processes (one thread, the tiny dataset written once)."""
    from acm_d2.data import ensure_synthetic_dataset

    cache = tmp_path_factory.mktemp("synthetic_cache")
    ensure_synthetic_dataset(["acm_synthetic_tiny_train"], cache_root=cache)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", ACM_D2_DATA_CACHE=str(cache))


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "cluster_driver.py"
    path.write_text(CLUSTER_DRIVER.format(tools=str(REPO / "tools")))
    return path


def run_ranks(commands, env, timeout=300, kill_on_failure=True):
    """Run one process per rank until all have ended or, with ``kill_on_failure``, one has
    failed (the others are then killed); fail if ``timeout`` seconds pass first (the processes
    are killed). Returns (exit codes, outputs)."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c, log in zip(commands, logs)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if kill_on_failure and any(p.poll() not in (None, 0) for p in procs):
                break
            assert time.monotonic() < deadline, f"ranks still running after {timeout} s"
            time.sleep(0.1)
    finally:
        for p in procs:
            kill_process_group(p)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
    return [p.returncode for p in procs], outputs


def kill_process_group(proc):
    """Kill ``proc`` (started with ``start_new_session=True``) and whatever it started that is still
    running (spawned workers, torchrun's workers), so that no test leaves processes behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # all of them have ended
        pass
    proc.wait()


def assert_ranks_succeed(commands, env):
    codes, outputs = run_ranks(commands, env)
    failed = [r for r, code in enumerate(codes) if code != 0]
    assert not failed, f"rank {failed[0]} failed (exit {codes[failed[0]]}):\n{outputs[failed[0]][-6000:]}"


def final_weights(out):
    """Both ranks' final weights (asserted identical), as rank 0's state dict."""
    w0 = torch.load(out / "weights_rank0.pth", weights_only=True)
    w1 = torch.load(out / "weights_rank1.pth", weights_only=True)
    assert w0.keys() == w1.keys() and [k for k in w0 if not torch.equal(w0[k], w1[k])] == []
    return w0


def runs(out, rank):
    return [json.loads(line) for line in (out / f"runs_rank{rank}.jsonl").read_text().splitlines()]


def torchrun_command(driver, out, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(driver), *flags, "--config-file", str(CONFIG), *cluster_opts(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, driver, cluster_env):
    """torchrun --nproc_per_node 2 train_net.py --num-gpus 2: the reference weights of these tests."""
    out = tmp_path_factory.mktemp("torchrun")
    torchrun = subprocess.Popen(
        torchrun_command(driver, out, "--num-gpus", "2"), cwd=REPO, env=cluster_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = torchrun.communicate(timeout=300)
    finally:
        kill_process_group(torchrun)
    assert torchrun.returncode == 0, output[-6000:]
    return out, torchrun.pid, final_weights(out)


@pytest.mark.slow
def test_torchrun_joins_from_the_environment(torchrun_run):
    out, torchrun_pid, weights = torchrun_run
    records = [runs(out, r) for r in (0, 1)]
    assert [len(r) for r in records] == [1, 1]  # one process per rank: nothing spawned twice
    (r0,), (r1,) = records
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["ppid"] == r1["ppid"] == torchrun_pid  # torchrun's own workers, not spawned by launch
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel" and r0["backend"] == r1["backend"] == "gloo"
    assert load_model_weights(out / "model_final.pth").keys() == weights.keys()


@pytest.mark.slow
def test_two_machines_on_one_host_end_with_the_same_weights(tmp_path, driver, cluster_env, torchrun_run):
    out = tmp_path / "out"
    url = f"tcp://127.0.0.1:{free_port()}"
    commands = [
        [sys.executable, str(driver), "--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(machine),
         "--dist-url", url, "--config-file", str(CONFIG), *cluster_opts(out)]
        for machine in (0, 1)
    ]
    assert_ranks_succeed(commands, cluster_env)
    assert [(r["rank"], r["world"], r["backend"]) for m in (0, 1) for r in runs(out, m)] == [(0, 2, "gloo"), (1, 2, "gloo")]
    weights, reference = final_weights(out), torchrun_run[2]
    assert [k for k in reference if not torch.equal(weights[k], reference[k])] == []


@pytest.mark.slow
def test_slurm_job_stopped_requeued_and_resumed_ends_with_the_same_weights(tmp_path, driver, cluster_env, torchrun_run, monkeypatch):
    from acm_d2.engine.slurm import submit_training

    out = tmp_path / "out"
    out.mkdir()
    for key, value in cluster_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ACM_TEST_WAIT_AT", "3")  # rank 1 waits at iteration 3 for the stop signal
    args = ["--config-file", str(CONFIG), *cluster_opts(out)]
    job = submit_training(driver, args, str(tmp_path / "jobs"), gpus_per_node=0, tasks_per_node=2, cpus_per_task=1,
                          time_min=10, cluster="local")
    try:
        deadline = time.monotonic() + 300
        while not (out / "waiting_pid").exists():
            assert not job.done(), f"the job ended before iteration 3:\n{job.task(0).stderr()}"
            assert time.monotonic() < deadline, "iteration 3 not reached in time"
            time.sleep(0.05)
        # SLURM sends SIGUSR2 to every task of the job (submitit asks for it with --signal=USR2@...)
        tasks = [runs(out, rank)[0]["pid"] for rank in (0, 1)]
        assert tasks[1] == int((out / "waiting_pid").read_text())
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        while not job.done():
            assert time.monotonic() < deadline, "the requeued job did not finish in time"
            time.sleep(0.2)
    finally:
        if not job.done():
            job.cancel()
    task0_log = job.task(0).stdout() + job.task(0).stderr()
    assert job.results() == [None, None], task0_log[-6000:]
    # stopped after iteration 3 with a checkpoint, requeued with --resume, resumed at iteration 4
    assert load_model_weights(out / "model_0000003.pth").keys() == torchrun_run[2].keys()
    assert [[r["start_iter"] for r in runs(out, rank)] for rank in (0, 1)] == [[0, 4], [0, 4]]
    assert all(len({r["pid"] for r in runs(out, rank)}) == 2 for rank in (0, 1))  # new task processes
    assert all(r["world"] == 2 for rank in (0, 1) for r in runs(out, rank))
    assert "Requeued job" in task0_log
    weights, reference = final_weights(out), torchrun_run[2]
    assert [k for k in reference if not torch.equal(weights[k], reference[k])] == []


# launch() as tools/train_net.py calls it; rank 1 fails (raises, or dies without a Python
# error, as when the out-of-memory killer ends it), the others wait for it in a barrier.
FAILING_DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from detectron2.utils import comm
    from acm_d2.engine import launch


    def main(how):
        if comm.get_rank() == 1:
            if how == "dies":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("worker failing on purpose")
        comm.synchronize()


    if __name__ == "__main__":
        num_gpus, num_machines, machine_rank, url, how = sys.argv[1:]
        launch(main, int(num_gpus), int(num_machines), int(machine_rank), url, args=(how,), device="cpu")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("launcher,how", [("torchrun", "raises"), ("two_machines", "dies")])
def test_a_failing_worker_ends_the_run_naming_its_rank(tmp_path, cluster_env, launcher, how):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_DRIVER)
    url = f"tcp://127.0.0.1:{free_port()}"
    if launcher == "torchrun":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
        codes, outputs = run_ranks([torchrun + [str(script), "1", "1", "0", url, how]], cluster_env, timeout=120)
        assert codes[0] != 0
        assert "Rank 1 (machine 0, local rank 1) failed: RuntimeError: worker failing on purpose" in outputs[0]
        assert re.search(r"rank\s*: 1 ", outputs[0]), outputs[0][-3000:]  # torchrun's summary of the failure
        return
    commands = [[sys.executable, str(script), "1", "2", str(machine), url, how] for machine in (0, 1)]
    # both "machines" end by themselves: machine 0's barrier fails when rank 1's connections close
    codes, outputs = run_ranks(commands, cluster_env, timeout=120, kill_on_failure=False)
    assert codes[0] != 0 and codes[1] != 0, outputs
    # rank 1 died without a Python error: launch names its global rank (torch: "process 0", its local index)
    assert "WorkerFailedError: Rank 1 (machine 1, local rank 0) died with SIGKILL" in outputs[1], outputs[1][-3000:]
    # rank 0's collective failed: it logs its rank, and its launch raises naming it
    assert "Rank 0 (machine 0, local rank 0) failed" in outputs[0], outputs[0][-3000:]
    assert "WorkerFailedError: Rank 0 (machine 0, local rank 0) raised an error" in outputs[0], outputs[0][-3000:]


def test_launcher_environment_is_read_and_checked(monkeypatch):
    from acm_d2.engine.launcher import external_launcher_environment

    assert external_launcher_environment({}) is None  # not started by a launcher: Detectron2's spawning
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert external_launcher_environment(env) == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2}
    with pytest.raises(ValueError, match=r"\['LOCAL_WORLD_SIZE', 'MASTER_PORT'\] are not"):
        external_launcher_environment({k: v for k, v in env.items() if k not in ("LOCAL_WORLD_SIZE", "MASTER_PORT")})
    with pytest.raises(ValueError, match="not a multiple of LOCAL_WORLD_SIZE 3"):
        external_launcher_environment(dict(env, LOCAL_WORLD_SIZE="3"))

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="--num-gpus 8 with a launcher that started 2 processes per machine"):
        launch_module.launch(print, 8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert launch_module.launch(lambda x: x * 2, 1, args=(21,)) == 42  # one process: nothing to join


# ------------------------------------------------------------ launches that cannot form a group
# launch() as train_net calls it; every rank says when the group has formed.
FORMING_DRIVER = textwrap.dedent(
    """
    import sys
    from detectron2.utils import comm
    from acm_d2.engine import launch


    def main():
        comm.synchronize()
        print(f"group formed: rank {comm.get_rank()} of {comm.get_world_size()}", flush=True)


    if __name__ == "__main__":
        num_gpus, num_machines, machine_rank, url = sys.argv[1:]
        launch(main, int(num_gpus), int(num_machines), int(machine_rank), url, device="cpu")
    """
)


@pytest.mark.parametrize(
    "num_gpus, num_machines, machine_rank, url, words",
    [
        (1, 2, 2, "tcp://127.0.0.1:1", "--machine-rank 2 with --num-machines 2: expected 0..1"),
        (1, 2, -1, "tcp://127.0.0.1:1", "--machine-rank -1 with --num-machines 2: expected 0..1"),
        (0, 1, 0, "auto", "--num-gpus 0: expected an integer >= 1"),
        (2, 2, 0, "auto", "--dist-url auto picks a port on this machine only; with --num-machines 2 give tcp://HOST0:PORT"),
    ],
)
def test_impossible_launch_settings_are_refused_at_once(num_gpus, num_machines, machine_rank, url, words):
    with pytest.raises(ValueError) as info:
        launch_module.launch(print, num_gpus, num_machines, machine_rank, url, device="cpu")
    assert words in str(info.value)


@pytest.fixture()
def forming_driver(tmp_path):
    path = tmp_path / "forming.py"
    path.write_text(FORMING_DRIVER)
    return path


def _children(pid: int):
    """The process ids whose parent is ``pid`` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return children


def test_machines_that_disagree_end_at_once_naming_them():
    """The roll call of two machines, one started with another --num-machines (threads here:
    the same store protocol as the processes, without their start-up)."""
    import threading

    import torch.distributed as dist

    from acm_d2.engine.rendezvous import GroupFormationError, _roll_call

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    members = [  # machine 0 of 2 (world size 2), machine 1 of 3 (world size 3)
        {"rank": 0, "world_size": 2, "num_gpus": 1, "num_machines": 2, "machine_rank": 0, "host": "h0", "pid": 10},
        {"rank": 1, "world_size": 3, "num_gpus": 1, "num_machines": 3, "machine_rank": 1, "host": "h1", "pid": 11},
    ]
    errors = {}

    def join(me):
        store = server if me["rank"] == 0 else dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        try:
            _roll_call(store, me, 30.0, url)
        except GroupFormationError as e:
            errors[me["rank"]] = str(e)

    threads = [threading.Thread(target=join, args=(me,)) for me in members]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start < 20  # at once, not after the 30 s join timeout
    expected = ("Training processes cannot form a group: the machines disagree on the world size: rank 1 (machine 1, "
                "host h1, pid 11, --num-gpus 1 --num-machines 3) expects 3 processes, rank 0 (machine 0, host h0, pid 10, "
                "--num-gpus 1 --num-machines 2) expects 2; start every machine with the same --num-gpus and --num-machines")
    assert errors == {0: expected, 1: expected}


def test_a_missing_machine_ends_naming_it_and_ctrl_c_ends_every_worker(forming_driver):
    """Run side by side (each start costs seconds): a machine 0 whose machine 1 never comes
    (ACM_D2_JOIN_TIMEOUT 3 s), and one interrupted while it waits."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    missing, interrupted = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    port = int(interrupted.rsplit(":", 1)[1])
    logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, str(forming_driver), *argv], cwd=REPO, env=dict(env, **extra),
                              stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for (argv, extra), log in zip([
                 (("1", "2", "0", missing), {"ACM_D2_JOIN_TIMEOUT": "3"}),
                 (("2", "2", "0", interrupted), {"ACM_D2_JOIN_TIMEOUT": "120"}),
             ], logs)]
    try:
        deadline = time.monotonic() + 120
        while True:  # until the interrupted run's rank 0 serves its port: its two workers wait for machine 1
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and procs[1].poll() is None, "rank 0 never served the port"
            time.sleep(0.2)
        workers = _children(procs[1].pid)
        assert len(workers) >= 2
        procs[1].send_signal(signal.SIGINT)  # Ctrl-C, to the parent only: it must end its workers itself
        codes = [p.wait(timeout=120) for p in procs]
        assert all(code != 0 for code in codes), codes
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read()]
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nobody listens on the port any more
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # and a new run can serve it
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
    finally:
        for p in procs:
            kill_process_group(p)
    assert (f"the group did not form within 3 s ($ACM_D2_JOIN_TIMEOUT): 1 of 2 processes joined at {missing}; "
            f"missing: ranks [1] (machine(s) [1])") in outputs[0], outputs[0][-3000:]


def test_hand_set_rank_and_world_size_without_the_rest_is_refused():
    """RANK=1 WORLD_SIZE=2 alone (no LOCAL_RANK) made every process train alone, silently."""
    from acm_d2.engine.launcher import external_launcher_environment

    with pytest.raises(ValueError, match=r"RANK, WORLD_SIZE are set .* but \['LOCAL_RANK', 'LOCAL_WORLD_SIZE', "
                                         r"'MASTER_ADDR', 'MASTER_PORT'\] are not: without them this process would train alone"):
        external_launcher_environment({"RANK": "1", "WORLD_SIZE": "2"})
    assert external_launcher_environment({"RANK": "0"}) is None  # a lone RANK=0 of some environment
    assert external_launcher_environment({"WORLD_SIZE": "1"}) is None


def test_env_rank_alone_ends_naming_the_missing_ranks(monkeypatch):
    """RANK=0 WORLD_SIZE=2 with one process started: init_process_group("env://") waited silently;
    the roll call ends it after $ACM_D2_JOIN_TIMEOUT seconds, naming rank 1."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "ACM_D2_JOIN_TIMEOUT": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ran = []
    with pytest.raises(GroupFormationError, match=r"the group did not form within 2 s \(\$ACM_D2_JOIN_TIMEOUT\): 1 of 2 "
                                                  r"processes joined at env:// \(MASTER_ADDR 127.0.0.1, MASTER_PORT \d+\); "
                                                  r"missing: ranks \[1\] \(machine\(s\) \[1\]\)\. Start every process with "
                                                  r"the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE"):
        launch_module.launch(ran.append, 1, args=(1,), device="cpu")
    assert ran == [] and not torch.distributed.is_initialized()
