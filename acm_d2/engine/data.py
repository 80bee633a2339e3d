"""A training data stream that resumes where an interrupted run stopped.

Detectron2's ``TrainingSampler`` starts its shuffled stream afresh when training resumes,
so a resumed run sees other images than the uninterrupted run would have, and the random
augmentations (flip, resize) come from a freshly seeded generator. Here:

* :class:`ResumableTrainingSampler` is Detectron2's stream (the same shuffles for the same
  seed, ``indices[rank::world_size]`` per process) that can start at any position: after
  ``resume(start_iter, batch_size)`` it skips what the first ``start_iter`` batches of this
  process consumed. It yields ``(position, index)`` pairs, ``position`` counting this
  process's stream from 0.
* :class:`SeededMapDataset` applies the mapper (augmentation) to ``dataset[index]`` after
  seeding Python's, NumPy's and torch's generators from ``(seed, rank, position)``, so the
  augmentation of an image depends only on where it is in the stream, not on what ran
  before, also in DataLoader worker processes.

The DataLoader gets its own seeded generator, so creating its iterator (Detectron2 does
that lazily, at the first step of each run) never draws from the global generators that the
trainer seeds at every iteration.

The guarantee (see docs/training.md): with the same seed and world size, a resumed run gets
exactly the batches of the uninterrupted run when DATALOADER.ASPECT_RATIO_GROUPING is off
(any NUM_WORKERS), or when it is on and NUM_WORKERS is 0 or 1 (the aspect-ratio buckets are
replayed from the image sizes, and the images waiting in them are fed again first). With
grouping on and NUM_WORKERS > 1 the DataLoader interleaves its workers' images before
grouping; the resumed stream then restarts at the right position but the first batches may
be grouped differently (each image is still seen equally often).
"""
import itertools
import logging
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetFromList, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from torch.utils import data as torchdata

__all__ = [
    "ResumableTrainingSampler",
    "SeededMapDataset",
    "build_resumable_train_loader",
    "derived_seed",
    "seed_all_generators",
]

logger = logging.getLogger(__name__)


def derived_seed(*entropy: int) -> int:
    """A 31-bit seed that is a deterministic function of the integers ``entropy``."""
    return int(np.random.SeedSequence([int(e) % 2**63 for e in entropy]).generate_state(1)[0]) % 2**31


def seed_all_generators(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global and torch's default generators."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's :class:`TrainingSampler` that can continue an interrupted stream.

    Args:
        size, shuffle, seed: as :class:`TrainingSampler` (seed None: a random seed shared by
            all processes; the trainer stores it in its checkpoints).
        aspect_groups: for each dataset index, its aspect-ratio group (0: width > height,
            1: otherwise) as ``AspectRatioGroupedDataset`` forms them; None if batches are
            not grouped by aspect ratio.

    Iterating yields ``(position, index)`` with ``position`` the place of ``index`` in this
    process's stream.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
        aspect_groups: Optional[Sequence[int]] = None,
    ):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self._aspect_groups = None if aspect_groups is None else list(aspect_groups)
        if self._aspect_groups is not None and len(self._aspect_groups) != size:
            raise ValueError(f"aspect_groups has {len(self._aspect_groups)} entries for a dataset of {size}")
        self._start = 0  # position in this process's stream to continue from
        self._replay: List[Tuple[int, int]] = []  # (position, index) to yield first

    @property
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = int(value)

    def _positions(self):
        """(position, index) of this process's whole stream, from position 0."""
        indices = itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)
        return enumerate(indices)

    def resume(self, start_iter: int, batch_size: int) -> None:
        """Continue after the first ``start_iter`` batches of ``batch_size`` (per process).

        Without aspect-ratio grouping these used the first ``start_iter * batch_size``
        positions. With grouping, the buckets of ``AspectRatioGroupedDataset`` are replayed
        from the image sizes: the stream continues after the last image used by batch
        ``start_iter - 1``, and the images that were waiting in the buckets come first.
        """
        self._replay = []
        if start_iter <= 0:
            self._start = 0
            return
        if self._aspect_groups is None:
            self._start = start_iter * batch_size
            logger.info("Data stream resumes at position %d of this process (iteration %d)", self._start, start_iter)
            return
        buckets: List[List[Tuple[int, int]]] = [[], []]
        emitted = 0
        for position, index in self._positions():
            bucket = buckets[self._aspect_groups[index]]
            bucket.append((position, index))
            if len(bucket) == batch_size:
                del bucket[:]
                emitted += 1
                if emitted == start_iter:
                    self._start = position + 1
                    break
        self._replay = sorted(buckets[0] + buckets[1])
        logger.info(
            "Data stream resumes at position %d of this process (%d waiting images replayed first)",
            self._start,
            len(self._replay),
        )

    def __iter__(self):
        yield from self._replay
        yield from itertools.islice(self._positions(), self._start, None)


class SeededMapDataset(torchdata.Dataset):
    """``mapper(dataset[index])`` for keys ``(position, index)``, with the generators seeded
    from ``(seed, rank, position)`` first, so random augmentations resume exactly.

    Like Detectron2's ``MapDataset``, a mapper that returns None (a sample to skip) makes it
    try other indices, here chosen deterministically from the position. An error of the
    mapper gets a note naming the image file (it reaches the traceback, also from a worker).
    """

    def __init__(self, dataset, mapper: Callable, seed: int, rank: Optional[int] = None):
        self._dataset = dataset
        self._mapper = mapper
        self.seed = int(seed)
        self._rank = comm.get_rank() if rank is None else rank

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key):
        position, index = key if isinstance(key, tuple) else (None, int(key))
        if position is not None:
            seed_all_generators(derived_seed(self.seed, self._rank, position, 1))
        for attempt in range(10):
            item = self._dataset[index]
            try:
                data = self._mapper(item)
            except Exception as e:
                if isinstance(item, dict) and "file_name" in item and hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(
                        f"while reading the training image {item['file_name']} (image id {item.get('image_id')}): "
                        f"replace the file or remove it from the dataset"
                    )
                raise
            if data is not None:
                return data
            if attempt >= 2:
                logger.warning("The mapper returned None for dataset index %d (attempt %d)", index, attempt + 1)
            index = int(np.random.randint(len(self._dataset)))
        raise RuntimeError(f"The mapper returned None for 10 dataset items in a row (last index {index})")


def build_resumable_train_loader(cfg, mapper=None, seed: Optional[int] = None):
    """``build_detection_train_loader(cfg)`` with a resumable stream.

    Returns ``(data_loader, sampler, dataset)``: the loader yields what Detectron2's yields;
    ``sampler`` is a :class:`ResumableTrainingSampler`, ``dataset`` the
    :class:`SeededMapDataset` (whose ``seed`` the trainer sets with the sampler's). Only for
    DATALOADER.SAMPLER_TRAIN "TrainingSampler".
    """
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"build_resumable_train_loader supports DATALOADER.SAMPLER_TRAIN 'TrainingSampler', "
            f"got {cfg.DATALOADER.SAMPLER_TRAIN!r}"
        )
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    grouping = cfg.DATALOADER.ASPECT_RATIO_GROUPING
    aspect_groups = None
    if grouping:
        # AspectRatioGroupedDataset's rule, on the (unchanged) width/height of the mapped dicts.
        aspect_groups = [0 if d["width"] > d["height"] else 1 for d in dicts]
    sampler = ResumableTrainingSampler(len(dicts), seed=seed, aspect_groups=aspect_groups)
    dataset = SeededMapDataset(
        DatasetFromList(dicts, copy=False),
        DatasetMapper(cfg, True) if mapper is None else mapper,
        seed=sampler.seed,
    )
    loader = build_detection_train_loader(
        dataset=dataset,
        mapper=None,
        sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=grouping,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        # The DataLoader's own generator: without one, creating its iterator (lazily, at the
        # first step of a run) draws from the global generator that IterationSeed has just
        # seeded, at iteration 0 in a full run but at the resume iteration in a resumed one.
        seed=derived_seed(sampler.seed, comm.get_rank(), 3),
    )
    if grouping and cfg.DATALOADER.NUM_WORKERS > 1:
        logger.info(
            "ASPECT_RATIO_GROUPING with NUM_WORKERS=%d: a resumed run continues the data stream at the "
            "right position, but its first batches may be grouped differently than without the "
            "interruption (exact with NUM_WORKERS <= 1 or without grouping)",
            cfg.DATALOADER.NUM_WORKERS,
        )
    return loader, sampler, dataset
