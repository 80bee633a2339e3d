"""Mask R-CNN R-50-FPN + ACM, 1x schedule, as a LazyConfig (Python) config.

Detectron2's ``configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py`` (built from its
``common/`` configs) with the ResNet replaced by :class:`acm_d2.ContextResNet` (ACM after conv3
+ norm of every bottleneck of the trained stages res3-res5, 32 groups, the authors' setting)
and the orthogonality loss ``loss_acm_orth`` with lambda = 0.1 over the res5 modules (the
authors' Detectron2 code). Runs with Detectron2's own
``tools/lazyconfig_train_net.py`` unchanged:

    python tools/lazyconfig_train_net.py \
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm_lazy.py

The ``import acm_d2`` below is what makes that work: the ACM classes are importable and the
ACM backbones registered before ``instantiate(cfg.model)``.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem

import acm_d2  # noqa: F401  (the config's targets live there)
from acm_d2 import ACMGeneralizedRCNN, ContextResNet

# The pieces of Detectron2's mask_rcnn_R_50_FPN_1x.py, taken from its model zoo.
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train

# ResNet-50 with ACM in every block of the stages after freeze_at (res3, res4, res5: 13 modules).
model.backbone.bottom_up = L(ContextResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
    stages=L(ContextResNet.make_default_stages)(
        depth=50,
        stride_in_1x1=True,
        norm="FrozenBN",
    ),
    out_features=["res2", "res3", "res4", "res5"],
    freeze_at=2,
    context_module="ACM",  # or a peer: "SE", "GC", "CBAM" (module_stages), "NL", "CC" (after_blocks)
    module_options=dict(
        groups=32,
        variant="P(X+(K-Q))",  # the full module; Table 2a: "X+(K-Q)", "P(X+K)", "PX" (quote on the command line)
    ),
    module_stages=None,  # None: every stage not frozen by freeze_at
)

# GeneralizedRCNN plus "loss_acm_orth" in its training loss dict (same state dict keys), over
# the res5 modules as the authors' Detectron2 code computes it (model.orth_loss_modules = "all"
# for the paper's equation 6). Set model.orth_loss_weight = 0 to train without the loss.
model._target_ = ACMGeneralizedRCNN
model.orth_loss_weight = 0.1
model.orth_loss_modules = "res5"

# ImageNet R-50 (MSRA, BGR, std 1): the ResNet loads, the ACM parameters are reported
# missing and keep their Kaiming-normal / zero-bias initialisation.
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
