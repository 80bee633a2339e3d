#!/usr/bin/env python
"""Plain backbone vs + SE vs + ACM, and the paper's ablations, same code and schedule, several seeds.

    python tools/compare_backbones.py                                   # plain, SE, ACM on the wide strips
    python tools/compare_backbones.py --variants "ACM,X+(K-Q),P(X+K),PX,plain,ACM lambda=0" \
        --output-dir output/ablation                                    # the paper's Table 2a and lambda
    python tools/compare_backbones.py --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml \
        --seeds 1 --jobs 1 --threads 0                                  # a GPU user on COCO

Every (variant, seed) is a tools/train_net.py run; finished runs are reused. Writes
``comparison.md``, ``comparison.png`` and ``comparison.json`` to the output folder (see
acm_d2/experiments/comparison.py for what is measured).
"""
import argparse
import logging
import shlex
import sys

from acm_d2.experiments.comparison import VARIANTS, run_comparison
from acm_d2.experiments.runs import QUICK_OPTS, REPO


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(REPO / "configs" / "Synthetic" / "mask_rcnn_R_18_FPN_acm_wide.yaml"))
    parser.add_argument("--output-dir", default=str(REPO / "output" / "compare"))
    parser.add_argument("--variants", default="plain,SE,ACM", help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (SEED 0..n-1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per run (0: leave as is)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="tiny data and a few iterations (tests)")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs that are already finished")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    command = "python tools/compare_backbones.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        result = run_comparison(
            args.config_file, args.output_dir, variants, args.seeds,
            (QUICK_OPTS if args.quick else []) + ["MODEL.DEVICE", device] + list(args.opts),
            jobs=args.jobs, threads=args.threads, reuse=not args.no_reuse, command=command.strip(),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    with open(result["markdown"]) as f:
        print(f.read())
    print(f"Wrote {result['markdown']}\nWrote {result['chart']}")
    return result


if __name__ == "__main__":
    main()
