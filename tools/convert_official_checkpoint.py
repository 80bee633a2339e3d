#!/usr/bin/env python
"""Convert a checkpoint of the ACM authors' Detectron2 fork to acm-d2's key layout.

    python tools/convert_official_checkpoint.py IN.pth OUT.pth \
        [--config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml [KEY VALUE ...]]

Renames ``<block>.module.{add_mod,sub_mod,mul_mod}.*`` to ``<block>.acm.{kq_logits,
channel_gate}.*`` (K and Q interleaved into kq_logits) and copies every other key. OUT holds
``{"model": state_dict}`` with tensors only, so ``torch.load(OUT, weights_only=True)`` and
``tools/train_net.py --eval-only --config-file ... MODEL.WEIGHTS OUT`` load it.

With ``--config-file`` (YAML, or a LazyConfig .py; overrides after it) the converted keys and
shapes are also compared with the model that config builds (on CPU, no weights): keys the
model lacks or the file lacks are listed. Exit status: 0 on success; 1 (nothing written) if
the file cannot be read, some ACM key cannot be converted (unknown name, incomplete module,
shapes inconsistent with one C and G), or the checked model misses ACM parameters or gets
other shapes.
"""
import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acm_d2.checkpoint import (  # noqa: E402
    CheckpointConversionError,
    CheckpointLoadError,
    convert_official_state_dict,
    load_checkpoint_file,
)

logger = logging.getLogger("acm_d2.convert")


def build_model_from_config(config_file: str, opts):
    """The model of a YAML or LazyConfig config, on CPU, without weights."""
    if config_file.endswith(".py"):
        from detectron2.config import LazyConfig, instantiate

        cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
        return instantiate(cfg.model)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from acm_d2 import add_acm_config

    cfg = get_cfg()
    add_acm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu"])
    return build_model(cfg)


def check_against_model(state_dict, model) -> bool:
    """Compare keys and shapes with ``model``; print the differences; True if ACM keys fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in state_dict
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    missing_acm = [k for k in missing if ".acm." in k]
    unexpected_acm = [k for k in unexpected if ".acm." in k]
    print(
        f"Checked against the config's model: {len(expected)} keys; {len(missing)} missing from the file "
        f"({len(missing_acm)} of them ACM), {len(unexpected)} not in the model ({len(unexpected_acm)} ACM), "
        f"{len(wrong_shape)} with other shapes."
    )
    for k in missing:
        print(f"  missing in file:  {k}")
    for k in unexpected:
        print(f"  not in model:     {k}")
    for k, got, want in wrong_shape:
        print(f"  shape mismatch:   {k}: file {got}, model {want}")
    return not (missing_acm or unexpected_acm or wrong_shape)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the authors' checkpoint (.pth: {'model': state_dict, ...} or a state dict)")
    parser.add_argument("output", help="where to write the converted {'model': state_dict} .pth")
    parser.add_argument("--config-file", default="", help="also check the result against this config's model")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load IN with torch.load(weights_only=False) if weights_only refuses it; this runs code "
        "stored in the file, so use it only for files from a source you trust",
    )
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides for --config-file: KEY VALUE ...")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if os.path.exists(args.output) and not args.force:
        print(f"error: {args.output} exists; pass --force to overwrite", file=sys.stderr)
        return 1
    try:
        state_dict = load_checkpoint_file(args.input, trust_pickle=args.trust_pickle)
        converted, report = convert_official_state_dict(state_dict, strict=True)
    except CheckpointLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointConversionError as e:
        print(f"error: {args.input}: {report_text(e)}", file=sys.stderr)
        return 1
    print(f"{args.input}: {report.summary()}")
    if not report.converted:
        print(f"warning: {args.input} has no ACM module in the authors' layout (<block>.module.add_mod.*)")

    ok = True
    if args.config_file:
        ok = check_against_model(converted, build_model_from_config(args.config_file, args.opts))

    if not ok:
        print(
            f"error: the converted weights do not fit the config's model (see above); {args.output} not written",
            file=sys.stderr,
        )
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save({"model": dict(converted)}, args.output)
    print(f"Wrote {args.output} ({len(converted)} tensors)")
    return 0


def report_text(error: CheckpointConversionError) -> str:
    report = error.report
    lines = [f"{len(report.errors())} ACM keys cannot be converted ({len(report.converted)} modules could):"]
    lines += [f"  {line}" for line in report.errors()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
