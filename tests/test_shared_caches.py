"""Caches that several processes share are built by one while the others wait (issue 18): the
built-in synthetic data (here: a changed cache, found by two ranks at once)."""
import threading

from acm_d2.data import synthetic
from acm_d2.data.synthetic import SyntheticSpec, cached_dataset, verify_cache

SPEC = SyntheticSpec(image_size=32, num_train=3, num_val=2, seed=11)


def test_a_changed_synthetic_cache_is_rebuilt_once_while_the_other_rank_waits(tmp_path, monkeypatch):
    folder = cached_dataset(SPEC, tmp_path)["folder"]
    (folder / "train.json").write_text("{}")  # changed: no longer matches the manifest
    writes = []
    real_write = synthetic.write_dataset
    monkeypatch.setattr(synthetic, "write_dataset", lambda *a: writes.append(a) or real_write(*a))
    errors = []

    def rank():
        try:
            paths = cached_dataset(SPEC, tmp_path)
            assert verify_cache(paths["folder"], SPEC) is None
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(2)]  # flock: per open file, so threads exclude each other
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(writes) == 1
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no leftovers
