"""The ACM paper's COCO results (Kim et al., ECCV 2020, arXiv 2007.07506, Table 6), to set
beside measured ones: Mask R-CNN trained on COCO 2017 train with Detectron2's 1x schedule,
evaluated on coco_2017_val; AP in %."""
from typing import Dict, Optional, Tuple

__all__ = ["TABLE6", "TABLE6_COLUMNS", "TABLE6_TEST_SET", "table6_row"]

TABLE6_TEST_SET = "coco_2017_val"
TABLE6_COLUMNS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")

#: (backbone, variant) -> the six numbers of TABLE6_COLUMNS.
TABLE6: Dict[Tuple[str, str], Tuple[float, ...]] = {
    ("R_50", "plain"): (38.59, 59.36, 42.23, 35.24, 56.24, 37.66),
    ("R_50", "SE"): (39.10, 60.32, 42.59, 35.72, 57.16, 38.20),
    ("R_50", "NL"): (39.40, 60.60, 43.02, 35.85, 57.63, 38.15),
    ("R_50", "CC"): (39.82, 60.97, 42.88, 36.05, 57.82, 38.37),
    ("R_50", "ACM"): (39.94, 61.58, 43.30, 36.40, 58.40, 38.63),
    ("R_101", "plain"): (40.77, 61.67, 44.53, 36.86, 58.35, 39.59),
    ("R_101", "SE"): (41.30, 62.36, 45.26, 37.38, 59.34, 40.00),
    ("R_101", "NL"): (41.57, 62.75, 45.39, 37.39, 59.50, 40.01),
    ("R_101", "CC"): (42.09, 63.21, 45.79, 37.77, 59.98, 40.29),
    ("R_101", "ACM"): (41.76, 63.38, 45.16, 37.68, 60.16, 40.19),
    ("X_101_32x8d", "plain"): (43.23, 64.42, 47.47, 39.02, 61.10, 42.11),
    ("X_101_32x8d", "SE"): (43.44, 64.91, 47.66, 39.20, 61.92, 42.17),
    ("X_101_32x8d", "NL"): (43.93, 65.44, 48.20, 39.45, 61.99, 42.33),
    ("X_101_32x8d", "CC"): (43.86, 65.28, 47.74, 39.26, 62.06, 41.97),
    ("X_101_32x8d", "ACM"): (44.07, 65.92, 48.33, 39.54, 62.53, 42.44),
}


def table6_row(backbone: Optional[str], variant: str) -> Optional[Dict[str, float]]:
    """The paper's numbers for a (backbone, variant) of a grid, {"bbox/AP": ..., ...}, or None."""
    values = TABLE6.get((backbone or "", variant))
    return dict(zip(TABLE6_COLUMNS, values)) if values else None
