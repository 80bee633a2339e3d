#!/usr/bin/env python
"""Convert a checkpoint of the ACM authors' Detectron2 fork to acm-d2's key layout.

    python tools/convert_official_checkpoint.py IN.pth OUT.pth \
        [--config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml [KEY VALUE ...]]

acm-d2's models load the authors' checkpoints as they are (every loader converts them), so
this tool is for a file in acm-d2's own layout with tensors only: ``<block>.module.{add_mod,
sub_mod,mul_mod}.*`` becomes ``<block>.context.{kq_logits,channel_gate}.*`` (see
acm_d2/authors_layout.py); OUT holds ``{"model": state_dict}``.

With ``--config-file`` (YAML, or LazyConfig .py; overrides after it) the result is compared
with the config's model (on CPU, without weights). Exit status 0 on success; 1, with nothing
written, if IN cannot be read safely, an ACM key cannot be converted, or the checked model's
ACM keys or shapes differ.
"""
import argparse
import logging
import os
import sys

import torch

from acm_d2.authors_layout import CheckpointConversionError, compare_with_model, convert_official_state_dict
from acm_d2.checkpoint import CheckpointLoadError, load_checkpoint_file
from acm_d2.config import build_model_from_config_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the authors' checkpoint (.pth: {'model': state_dict, ...} or a state dict)")
    parser.add_argument("output", help="where to write the converted {'model': state_dict} .pth")
    parser.add_argument("--config-file", default="", help="also check the result against this config's model")
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="load IN with torch.load(weights_only=False) if weights_only refuses it; this runs code stored in "
        "the file, so use it only for files from a source you trust",
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides for --config-file")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if os.path.exists(args.output) and not args.force:
        print(f"error: {args.output} exists; pass --force to overwrite", file=sys.stderr)
        return 1
    try:
        converted, report = convert_official_state_dict(load_checkpoint_file(args.input, trust_pickle=args.trust_pickle))
    except (CheckpointLoadError, CheckpointConversionError) as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 1
    print(f"{args.input}: {report.summary()}")
    if not report.converted:
        print(f"warning: {args.input} has no ACM module in the authors' layout (<block>.module.add_mod.*)")
    if args.config_file:
        ok, lines = compare_with_model(converted, build_model_from_config_file(args.config_file, args.opts, device="cpu"))
        print("\n".join(lines))
        if not ok:
            print(f"error: the converted weights do not fit the config's model (see above); {args.output} not written",
                  file=sys.stderr)
            return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": dict(converted)}, args.output)
    print(f"Wrote {args.output} ({len(converted)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
