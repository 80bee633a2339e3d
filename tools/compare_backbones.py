#!/usr/bin/env python
"""Backbones x modules x seeds, same code and schedule: ACM against the plain backbone and its
peers (the paper's Table 6 on any data), and the paper's ablations; locally or on SLURM.

    python tools/compare_backbones.py                                   # plain, SE, ACM on the wide strips
    python tools/compare_backbones.py --variants plain,SE,NL,CC,GC,CBAM,ACM --seeds 5 \
        --output-dir output/compare_wide                                # every peer (docs/comparison.md)
    python tools/compare_backbones.py --variants "ACM,X+(K-Q),P(X+K),PX,plain,ACM lambda=0" \
        --output-dir output/ablation                                    # the paper's Table 2a and lambda
    python tools/compare_backbones.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml \
        --backbones R_50,R_101,X_101_32x8d --variants plain,SE,NL,CC,ACM --seeds 1 \
        --slurm --nodes 1 --gpus-per-node 8 --partition gpu --time 4320 --output-dir /shared/table6  # Table 6

Every (backbone, variant, seed) is a tools/train_net.py run: a local process (``--jobs`` at a
time) or, with ``--slurm``, a SLURM job that requeues itself before its time limit. Calling
it again reuses finished runs, never submits a run whose job is still alive, lists failed
runs with their logs' last lines (``--retry-failed`` trains them again) and collects the
results. ``--dry-run`` prints every command or job, one line each. Writes ``comparison.md``,
``comparison.png`` and ``comparison.json`` to the output folder (acm_d2/experiments/).
"""
import argparse
import logging
import shlex
import sys

from acm_d2.engine.slurm import parse_slurm_options
from acm_d2.experiments.comparison import VARIANTS, run_comparison
from acm_d2.experiments.grid import BACKBONES, GridInUseError, SlurmSettings
from acm_d2.experiments.runs import QUICK_OPTS, REPO


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm_wide.yaml"))
    parser.add_argument("--output-dir", default=str(REPO / "output" / "compare"))
    parser.add_argument("--variants", default="plain,SE,ACM", help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--backbones", default="", help=f"comma-separated, from {list(BACKBONES)} (default: the config's)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (SEED 0..n-1)")
    parser.add_argument("--jobs", type=int, default=2, help="local runs at the same time")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per local run (0: leave as is)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="tiny data and a few iterations (tests)")
    parser.add_argument("--retry-failed", action="store_true", help="train the runs that failed before again")
    parser.add_argument("--dry-run", action="store_true", help="print every command / job, one line each; run nothing")
    slurm = parser.add_argument_group("SLURM (one job per run; see docs/clusters.md)")
    slurm.add_argument("--slurm", action="store_true", help="submit every run as a SLURM job (submitit)")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="one process per GPU (0: one CPU process)")
    slurm.add_argument("--time", type=int, default=60 * 24, help="minutes per job run; it requeues itself before")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--cpus-per-task", type=int, default=10)
    slurm.add_argument("--slurm-option", action="append", default=[], metavar="KEY[=VALUE]", help="more sbatch options")
    slurm.add_argument("--setup", action="append", default=[], metavar="LINE", help="shell line before the tasks")
    slurm.add_argument("--cluster", choices=["slurm", "local"], default=None,
                       help="default: SLURM if sbatch is found, else submitit's local executor")
    slurm.add_argument("--no-wait", action="store_true", help="submit and return; a later call collects")
    slurm.add_argument("--poll", type=float, default=60.0, help="seconds between checks of the jobs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    return parser


def main(argv=None) -> dict:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()] or [None]
    slurm = None
    if args.slurm:
        slurm = SlurmSettings(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_min=args.time,
                              partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
                              options=parse_slurm_options(args.slurm_option), setup=args.setup, cluster=args.cluster)
    command = "python tools/compare_backbones.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        result = run_comparison(
            args.config_file, args.output_dir, variants, args.seeds,
            (QUICK_OPTS if args.quick else []) + ["MODEL.DEVICE", device] + list(args.opts),
            backbones=backbones, jobs=args.jobs, threads=args.threads, slurm=slurm, retry_failed=args.retry_failed,
            wait=not args.no_wait, dry_run=args.dry_run, command=command.strip(), poll_s=args.poll,
        )
    except (ValueError, ImportError, GridInUseError) as e:
        raise SystemExit(f"error: {e}")
    if args.dry_run:
        print("\n".join(result["commands"]))
        return result
    with open(result["markdown"]) as f:
        print(f.read())
    print(f"Wrote {result['markdown']}\nWrote {result['chart']}\nWrote {result['json']}")
    return result


if __name__ == "__main__":
    main()
