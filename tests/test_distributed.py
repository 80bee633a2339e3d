"""tools/train_net.py --num-gpus 2 on the CPU: two gloo processes train a tiny Mask R-CNN + ACM
with naiveSyncBN and find_unused_parameters off; both ranks finish with identical weights,
and loss_acm_orth is averaged over the ranks like Detectron2's other losses."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from detectron2.layers import get_norm
from torch import nn

from acm_d2.engine import check_distributed_setup
from acm_d2.engine import launcher as launch_module
from test_train_net import CONFIG, REPO, load_model_weights, read_metrics, tiny_opts, write_tiny_coco

# Runs tools/train_net.py's own command line (argument_parser, launch, setup, main, Trainer)
# with one probe hook added to its Trainer, in every process (spawned workers re-run this
# file's top level, so the patched Trainer is theirs too).
DRIVER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tools!r})
    import torch
    import train_net
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
