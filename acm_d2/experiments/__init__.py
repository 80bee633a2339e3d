"""Experiments on the built-in data: the demo and the backbone comparison (tools/demo.py,
tools/compare_backbones.py). They run ``tools/train_net.py`` of this checkout, the path a
user takes, and read what it wrote."""
