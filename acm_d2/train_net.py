"""Train and evaluate Detectron2 models with ACM: ``acm-d2-train-net`` / ``python -m acm_d2.train_net``.

Detectron2's tools/train_net.py with the ACM config keys, COCO evaluation, and the
registration of COCO-format datasets named on the command line or in the config
(``--register-coco NAME JSON IMAGE_ROOT``, ``DATASETS.COCO_INSTANCES``), done in every
process so that the workers started by ``launch`` have them too. The trainer is
:class:`acm_d2.engine.ResumableTrainer` (safe and atomic checkpoints, exact ``--resume``, named
non-finite losses, ``--num-gpus N`` as N CPU processes with gloo when there is no GPU);
see docs/training.md.

``--config-file`` takes a path or a config shipped with the package, named
``acm_d2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml`` (see
:mod:`acm_d2.model_zoo`). ``tools/train_net.py`` of the checkout is this module.
"""
import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.modeling import GeneralizedRCNNWithTTA

from detectron2.utils.logger import setup_logger

from acm_d2 import __version__, get_acm_cfg
from acm_d2.data import check_num_classes, check_same_categories, register_coco_format_dataset
from acm_d2.evaluation import build_coco_evaluator
from acm_d2.model_zoo import resolve_config_file
from acm_d2.engine import SafeCheckpointer, ResumableTrainer, launch, prepare_output_dir


class Trainer(ResumableTrainer):
    """ResumableTrainer (Detectron2's DefaultTrainer, made resumable) with COCO evaluation for the
    datasets of DATASETS.TEST."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type != "coco":
            raise ValueError(
                f"DATASETS.TEST has {dataset_name!r} with evaluator_type {evaluator_type!r}; "
                f"acm_d2.train_net (tools/train_net.py) evaluates COCO-format datasets (evaluator_type 'coco')"
            )
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_coco_evaluator(cfg, dataset_name, output_dir=output_folder)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        logging.getLogger("detectron2.trainer").info("Running inference with test-time augmentation ...")
        model = GeneralizedRCNNWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})


def register_datasets(cfg, args) -> None:
    """Register the COCO-format datasets of ``--register-coco`` and DATASETS.COCO_INSTANCES."""
    for entry in list(cfg.DATASETS.COCO_INSTANCES) + list(args.register_coco or []):
        if len(entry) != 3:
            raise ValueError(
                f"DATASETS.COCO_INSTANCES entries are [name, json_file, image_root]; got {list(entry)!r}"
            )
        register_coco_format_dataset(*entry, allow_outside_root=cfg.DATASETS.COCO_ALLOW_OUTSIDE_ROOT)


def setup(args):
    """Create the config (YAML read safely), register the datasets and do Detectron2's basic
    set-up; acm-d2's own log lines go to the same log as Detectron2's."""
    args.config_file = resolve_config_file(args.config_file)  # acm_d2://NAME: a config of the package
    cfg = get_acm_cfg(args.config_file, args.opts)
    cfg.freeze()
    # Lock OUTPUT_DIR, refuse an overwrite or a resume with a breaking config change: before
    # default_setup writes config.yaml (see acm_d2.engine.run_dir).
    # --eval-only: OUTPUT_DIR becomes OUTPUT_DIR/eval/<weights file stem>/, MODEL.WEIGHTS the file evaluated.
    cfg = prepare_output_dir(cfg, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="acm_d2", abbrev_name="acm_d2")
    if args.eval_only:
        logging.getLogger("acm_d2.train_net").info(
            "--eval-only: evaluating %s; writing into %s (config.yaml, log.txt, inference/), a folder of its own: "
            "the files of a run in OUTPUT_DIR are left as they are", cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR,
        )
    register_datasets(cfg, args)  # after the loggers: its log lines (what was registered) reach log.txt
    return cfg


def main(args):
    cfg = setup(args)

    if args.eval_only:
        check_num_classes(cfg, cfg.DATASETS.TEST)
        check_same_categories(cfg)
        model = Trainer.build_model(cfg)
        # Every parameter must come from the checkpoint: no random heads are evaluated.
        # MODEL.WEIGHTS: the file to evaluate, also with --resume (set by prepare_output_dir)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR, require_complete=True).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks([hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()


def argument_parser():
    """Detectron2's default argument parser plus ``--register-coco`` and ``--version``."""
    parser = default_argument_parser()
    parser.add_argument("--version", action="version", version=f"acm-d2 {__version__}")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start afresh in an OUTPUT_DIR that holds an earlier run's checkpoints (they are moved into OUTPUT_DIR/previous_runs/)",
    )
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format instances dataset under NAME (repeatable)",
    )
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print(f"acm-d2 {__version__}, Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=get_acm_cfg(args.config_file, args.opts).MODEL.DEVICE,  # "cpu": --num-gpus CPU processes with gloo
    )


if __name__ == "__main__":
    invoke_main()
