#!/usr/bin/env python
"""Train and evaluate Detectron2 models with ACM: the command line of :mod:`acm_d2.train_net`
(also installed as ``acm-d2-train-net`` and runnable as ``python -m acm_d2.train_net``)."""
from acm_d2.train_net import invoke_main

if __name__ == "__main__":
    invoke_main()
