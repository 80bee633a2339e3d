#!/usr/bin/env python
"""Gain of ACM (and its peers) at initialisation in a trained backbone, and training from that start.

    # everything in docs/initialisation.md (figures into docs/images/), about 40 minutes on 2 CPU cores:
    python tools/measure_init_gain.py --train-pretrained --train-seeds 5 --images-dir docs/images

    python tools/measure_init_gain.py --scenarios sweep                   # single modules only (seconds)
    python tools/measure_init_gain.py --pretrained output/init_gain/plain_pretrain/model_final.pth \
        --scenarios sweep,pretrained                                      # reuse a trained plain model

Steps: (1) with --train-pretrained, train the plain R-18 of configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml
(MODEL.ACM.MODULE none) on the built-in data with tools/train_net.py (reused when finished);
(2) measure the scenarios of acm_d2/experiments/init_gain.py (SCENARIOS, and "sweep");
(3) with --train-seeds N, fine-tune from the trained backbone (FrozenBN, FREEZE_AT 2, the COCO
recipe scaled to 4 images, warmup shortened to 100 iterations, 300 iterations) plain / ACM
authors / ACM identity for seeds 0..N-1. Finished scenarios (output-dir/scenarios/*.json) and
runs are reused (--no-reuse measures again). Writes init_gain.json, init_gain.md and the figures.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from acm_d2.experiments import init_gain
from acm_d2.experiments.runs import REPO, run_train_net

TRAIN_ITERS = 300


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(REPO / "output" / "init_gain"))
    parser.add_argument("--images-dir", default=None, help="where the figures go (default: the output dir)")
    parser.add_argument("--scenarios", default="sweep," + ",".join(init_gain.SCENARIOS),
                        help=f"comma-separated, from {['sweep', *init_gain.SCENARIOS]}")
    parser.add_argument("--pretrained", default=None, help="checkpoint of the trained plain model")
    parser.add_argument("--train-pretrained", action="store_true", help="train the plain model first (reused if done)")
    parser.add_argument("--train-seeds", type=int, default=0, help="fine-tuning runs per start (0: none)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at the same time")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("--no-reuse", action="store_true", help="measure again the scenarios measured before")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(1)
    out = Path(args.output_dir)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s != "sweep" and s not in init_gain.SCENARIOS]
    if unknown:
        raise SystemExit(f"error: unknown scenarios {unknown}; allowed: {['sweep', *init_gain.SCENARIOS]}")
    pretrained = args.pretrained
    if args.train_pretrained:
        plain_dir = out / "plain_pretrain"
        if not (plain_dir / "model_final.pth").is_file():
            run_train_net(REPO / init_gain.R18_CONFIG, ["MODEL.ACM.MODULE", "none", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0",
                                                        "SEED", "0", "MODEL.DEVICE", "cpu"], plain_dir, threads=1,
                          log_path=out / "plain_pretrain.log")
        pretrained = str(plain_dir / "model_final.pth")
    results = {}
    for name in scenarios:
        saved = out / "scenarios" / f"{name}{'_quick' if args.quick else ''}.json"
        if saved.is_file() and not args.no_reuse:
            logging.info("Reusing %s", saved)
            results.update(json.loads(saved.read_text()))
            continue
        if name == "sweep":
            channels, groups, size = (32, 4, 6) if args.quick else (512, 16, 16)
            sigmas = (0.1, 10.0) if args.quick else init_gain._SWEEP_SIGMAS
            found = {"sweep": init_gain.run_sweep(channels, groups, size, sigmas=sigmas), "sweep_channels": channels, "sweep_size": size}
        else:
            found = {name: init_gain.run_scenario(name, pretrained, quick=args.quick)}
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(found))
        results.update(found)
    runs = None
    if args.train_seeds:
        if not pretrained:
            raise SystemExit("error: --train-seeds needs --pretrained or --train-pretrained")
        weights = init_gain.write_backbone_checkpoint(pretrained, out / "plain_backbone.pth")
        opts = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", "2", "SOLVER.MAX_ITER", str(TRAIN_ITERS),
                "SOLVER.STEPS", f"({TRAIN_ITERS * 2 // 3}, {TRAIN_ITERS * 9 // 10})", "SOLVER.CHECKPOINT_PERIOD", "100000"]
        opts += init_gain.coco_recipe(4, warmup_iters=100)
        runs = init_gain.run_init_comparison(REPO / init_gain.R18_CONFIG, weights, out / "train",
                                             ["plain", "ACM authors", "ACM identity"], args.train_seeds, opts, jobs=args.jobs)
    written = init_gain.write_report(results, out, args.images_dir, runs)
    print(written["markdown"].read_text())
    for path in written.values():
        print(f"Wrote {path}")
    return {"results": results, "runs": runs, "written": written}


if __name__ == "__main__":
    main(sys.argv[1:])
