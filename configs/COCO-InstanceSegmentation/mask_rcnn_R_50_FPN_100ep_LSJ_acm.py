"""Mask R-CNN R-50-FPN + ACM, Detectron2's "new baselines" recipe: 100 epochs from scratch,
large-scale jitter (1024 px crops of 0.1x-2x rescaled images), SyncBN, batch 64, AMP.

Detectron2's ``new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`` with the ResNet replaced by
:class:`acm_d2.ContextResNet` and the orthogonality loss (lambda 0.1, over all modules). With freeze_at = 0 every
stage is trained, so ACM goes into all 16 bottlenecks of R-50 (the paper's count). The only
other change: the heads' norm is given by its name "naiveSyncBN_N" instead of an equivalent
lambda, so that ``LazyConfig.save`` can write this config as YAML.

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_100ep_LSJ_acm.py
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem

import acm_d2  # noqa: F401  (the config's targets live there)
from acm_d2 import ACMGeneralizedRCNN, ContextResNet

_baseline = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
model = _baseline.model
dataloader = _baseline.dataloader
optimizer = _baseline.optimizer
lr_multiplier = _baseline.lr_multiplier
train = _baseline.train
del _baseline

# ResNet-50 with ACM in every block of every stage (freeze_at = 0: trained from scratch).
model.backbone.bottom_up = L(ContextResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="SyncBN"),
    stages=L(ContextResNet.make_default_stages)(
        depth=50,
        stride_in_1x1=True,
        norm="SyncBN",
    ),
    out_features=["res2", "res3", "res4", "res5"],
    freeze_at=0,
    context_module="ACM",
    module_options=dict(groups=32),
    module_stages=None,  # None: every stage not frozen by freeze_at (all four here)
)
# Same as the baseline's lambda c: NaiveSyncBatchNorm(c, stats_mode="N"), but serialisable.
model.roi_heads.box_head.conv_norm = model.roi_heads.mask_head.conv_norm = "naiveSyncBN_N"

# GeneralizedRCNN plus "loss_acm_orth" in its training loss dict (same state dict keys). Not
# a reproduction of the paper's runs, so the loss is the paper's equation 6, over all modules.
model._target_ = ACMGeneralizedRCNN
model.orth_loss_weight = 0.1
model.orth_loss_modules = "all"
