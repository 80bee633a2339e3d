"""The config keys of acm-d2."""
from detectron2.config import CfgNode as CN

__all__ = ["add_acm_config"]


def add_acm_config(cfg) -> None:
    """Add MODEL.ACM and DATASETS.COCO_INSTANCES to a Detectron2 config (in place)."""
    cfg.MODEL.ACM = CN()
    # The module each block of the chosen stages hosts, after its last conv + norm and before
    # the shortcut add: "ACM" (default), "SE" (squeeze-and-excitation, the paper's peer) or
    # "none" (the plain ResNet through the same code, for comparisons).
    cfg.MODEL.ACM.MODULE = "ACM"
    # G: channel groups of every ACM; each group has its own K and Q attention map. Must divide
    # half the channels of every stage that gets ACM (all stages of R-50: 1..128). Paper: 32.
    cfg.MODEL.ACM.GROUPS = 32
    # Stages that get a module, from "res2", "res3", "res4", "res5". Empty (default): every
    # stage not frozen by MODEL.BACKBONE.FREEZE_AT, as the authors did (res3-res5 for
    # FREEZE_AT=2: 13 modules in R-50). Naming a frozen stage is an error.
    cfg.MODEL.ACM.STAGES = []
    # lambda of the orthogonality loss "loss_acm_orth" = lambda * |mean_batch sum_modules
    # (K.Q)/C|; a finite number >= 0, 0 turns it off. Paper: 0.1. It is added by
    # MODEL.META_ARCHITECTURE "WithACMOrthLoss" (see META_ARCHITECTURE below).
    cfg.MODEL.ACM.ORTH_LOSS_WEIGHT = 0.1
    # The meta-architecture that "WithACMOrthLoss" builds and adds the loss to: any name in
    # META_ARCH_REGISTRY whose training forward returns a loss dict (GeneralizedRCNN, RetinaNet).
    cfg.MODEL.ACM.META_ARCHITECTURE = "GeneralizedRCNN"
    # Reduction ratio of the SE modules when MODULE is "SE".
    cfg.MODEL.ACM.SE_REDUCTION = 16

    # Users' COCO-format datasets that tools/train_net.py registers before training, in every
    # process: a list of [name, json_file, image_root] triples; the names can then be used
    # in DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.COCO_INSTANCES = []
