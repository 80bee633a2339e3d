#!/usr/bin/env python
"""Submit a training to SLURM with submitit; it checkpoints, requeues and resumes by itself.

    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --time 4320 \\
        --slurm account=myproject --job-dir /shared/jobs/r50_acm -- \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml \\
        OUTPUT_DIR /shared/output/r50_acm

Everything after ``--`` goes to tools/train_net.py (or ``--script``). One task per GPU; the
tasks join one process group (as under torchrun). Before the time limit or on preemption
the job saves a checkpoint, requeues itself and continues with ``--resume``. Needs
``pip install submitit``. See docs/clusters.md and :mod:`acm_d2.engine.slurm`.
"""
import argparse
import logging
import sys
from pathlib import Path

from acm_d2.engine.slurm import parse_slurm_options, submit_training

TRAIN_NET = Path(__file__).resolve().with_name("train_net.py")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine, one process each (default 8; 0: CPU)")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="processes per machine (default: one per GPU)")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--time", type=int, default=60 * 24, help="time limit of one job run, minutes (default 1440)")
    parser.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per process (data loading; default 10)")
    parser.add_argument("--mem-gb", type=float, default=None, help="memory per machine, GB (default: the cluster's)")
    parser.add_argument("--signal-delay", type=int, default=120, help="seconds before the time limit to stop with a checkpoint (default 120)")
    parser.add_argument("--max-requeues", type=int, default=10, help="requeues at the time limit (preemptions do not count; default 10)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY[=VALUE]",
                        help="any other sbatch option, e.g. --slurm account=abc --slurm qos=high --slurm exclusive (repeatable)")
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="shell line run before the tasks, e.g. 'source .venv/bin/activate' (repeatable)")
    parser.add_argument("--job-dir", default="output/slurm_jobs", help="submitit's folder (logs, job state), on a shared file system")
    parser.add_argument("--name", default="acm_d2", help="job name")
    parser.add_argument("--cluster", choices=["slurm", "local"], default=None,
                        help="default: SLURM if sbatch is found, else processes on this machine")
    parser.add_argument("--script", default=str(TRAIN_NET), help="training script (default tools/train_net.py)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of the training script")
    return parser


def main(argv=None) -> None:
    args = argument_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if not train_args:
        sys.exit("Give the training arguments after --, e.g. -- --config-file CONFIG OUTPUT_DIR /shared/output/run")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        job = submit_training(
            args.script, train_args, args.job_dir, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            tasks_per_node=args.tasks_per_node, partition=args.partition, time_min=args.time,
            cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, signal_delay_s=args.signal_delay,
            max_requeues=args.max_requeues, slurm_options=parse_slurm_options(args.slurm), setup=args.setup,
            name=args.name, cluster=args.cluster,
        )
    except ImportError as e:
        sys.exit(str(e))
    print(f"Submitted job {job.job_id}; logs: {Path(args.job_dir).resolve()}/{job.job_id}_*_log.out")


if __name__ == "__main__":
    main()
