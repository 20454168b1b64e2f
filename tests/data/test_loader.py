"""The one loader stack: views in workers, collate, and the bad-image policy (replace within the
class, the set or the shard; never in evaluation; every failure named)."""
import functools
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bitlab.data import datasets as ds, loader as L, shards
from bitlab.data.multilabel import MultiLabelSet
from bitlab.data.transforms import BadImageError, TrainAugment, decode_image, square_eval_image, to_chw_tensor, \
    train_image
from bitlab.train.distributed import StepSampler

STREAM = 0x617567
AUG = TrainAugment(40, 32)


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def photo_tree(tmp_path, photos) -> Path:
    """{cat,coffee}/{0,1,2}.jpg from real photos (crops of them), sorted cat first."""
    root = tmp_path / "t"
    for i in range(3):
        _write(root / "cat" / f"{i}.jpg", photos["chelsea"][i * 10:, i * 10:])
        _write(root / "coffee" / f"{i}.jpg", photos["coffee"][i * 10:, i * 10:])
    return root


def train_files(images, skip_bad=False, seed=0):
    return L.TrainFiles(images, functools.partial(train_image, aug=AUG), seed=seed, stream=STREAM, skip_bad=skip_bad,
                        decode_side=AUG.resize)


def first_batch(dataset, batch_size, workers=0):
    sampler = StepSampler(len(dataset), batch_size, seed=0)
    return next(iter(L.make_loader(dataset, batch_size, sampler=sampler, workers=workers)))


def view_of(path, position, seed=0):
    rng = np.random.default_rng((seed, STREAM, position))
    return to_chw_tensor(train_image(decode_image(path, min_side=AUG.resize), AUG, rng))


def test_train_loader_yields_uint8_views_reproducibly(photo_tree):
    images = ds.image_folder(photo_tree)
    dataset = train_files(images, seed=5)
    a, b = first_batch(dataset, 6, workers=2), first_batch(dataset, 6, workers=0)
    assert a.images.dtype == torch.uint8 and a.images.shape == (6, 3, 32, 32)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)  # workers don't matter
    assert sorted(a.targets.tolist()) == [0] * 3 + [1] * 3 and a.replaced == a.errors == ()


def test_bad_training_image_is_replaced_by_one_of_its_class(photo_tree):
    """Sorted by path, cat/2.jpg is followed by cat/0.jpg (its class wraps round), not coffee/0.jpg."""
    (photo_tree / "cat" / "2.jpg").write_bytes(b"not a jpeg")
    images = ds.image_folder(photo_tree)
    img, label, bad = train_files(images, skip_bad=True)[(2, 0)]
    assert label == 0 and len(bad) == 1 and "2.jpg" in bad[0]
    assert torch.equal(img, view_of(images.paths[0], 0))  # the substitute, augmented as position 0
    img, label, bad = train_files(images)[(2, 0)]  # without skip_bad: no image, the file named
    assert img is None and bad == (f"{images.paths[2]}: cannot decode image (corrupt or not an image)",)
    for p in (photo_tree / "cat").glob("*.jpg"):
        p.write_bytes(b"broken")
    img, label, bad = train_files(images, skip_bad=True)[(1, 0)]  # a class with no readable file: each tried once
    assert img is None and len(bad) == 3 and all("cat" in m for m in bad)


def test_a_batch_keeps_its_size_when_bad_images_are_replaced(photo_tree):
    bad = photo_tree / "cat" / "1.jpg"
    bad.write_bytes(b"not a jpeg at all")
    images = ds.image_folder(photo_tree)
    batch = first_batch(train_files(images), 6)
    assert len(batch.images) == 5 and batch.errors == (f"{bad}: cannot decode image (corrupt or not an image)",)
    skipped = first_batch(train_files(images, skip_bad=True), 6)
    assert len(skipped.images) == 6 and skipped.errors == () and str(bad) in skipped.replaced[0]
    assert sorted(skipped.targets.tolist()) == [0] * 3 + [1] * 3  # the class balance is kept


def test_multilabel_images_are_replaced_by_the_next_of_the_set(photo_tree):
    paths = sorted(photo_tree.rglob("*.jpg"))
    images = MultiLabelSet(paths, [[0], [0, 1], [1], [], [1], [0]], ["a", "b"])
    Path(paths[1]).write_bytes(b"broken")
    img, target, bad = train_files(images, skip_bad=True)[(1, 4)]
    assert torch.equal(target, torch.tensor([0, 1], dtype=torch.uint8))  # the substitute's labels, multi-hot
    assert torch.equal(img, view_of(paths[2], 4)) and str(paths[1]) in bad[0]


def test_evaluation_never_substitutes_and_unlabelled_paths_work(photo_tree):
    bad = photo_tree / "coffee" / "0.jpg"
    bad.write_bytes(b"broken")
    images = ds.image_folder(photo_tree)
    evals = next(iter(L.make_loader(L.EvalFiles(images, functools.partial(square_eval_image, crop=32), 32), 8)))
    assert len(evals.images) == 5 and evals.targets.tolist() == [0, 0, 0, 1, 1] and str(bad) in evals.errors[0]
    plain = next(iter(L.make_loader(L.EvalFiles(list(images.paths), functools.partial(square_eval_image, crop=32),
                                                 32), 8, workers=2)))
    assert plain.targets is None and torch.equal(plain.images, evals.images)
    with pytest.raises(BadImageError, match="cannot decode"):
        decode_image(bad)


def test_an_opencv_error_in_a_view_is_named(photo_tree):
    def squash(img):  # a view OpenCV refuses for this image: a zero-sized target
        return cv2.resize(img, (0, 0))

    item = L.EvalFiles(ds.image_folder(photo_tree), squash)[0]
    assert item.image is None and item.messages[0].startswith(f"{photo_tree / 'cat' / '0.jpg'}: cannot process image")


def test_a_bad_shard_sample_is_replaced_by_the_next_of_its_shard(photo_tree, tmp_path):
    index = shards.write_shards(ds.image_folder(photo_tree), tmp_path / "s", shard_size=6, shuffle=False,
                                progress=False)
    samples = shards.read_shard(index.path(0))
    samples[0].fields["jpg"] = b"broken"
    views = L.ShardViews(functools.partial(train_image, aug=AUG), num_classes=2, multi=False, seed=0,
                              stream=STREAM, skip_bad=True)
    img, label, bad = views(samples, 0, (0, 0, 0))
    assert label == 0 and len(bad) == 1 and bad[0].startswith(f"{samples[0].name}.jpg: cannot decode")
    strict = L.ShardViews(functools.partial(train_image, aug=AUG), num_classes=2, multi=False, seed=0,
                               stream=STREAM, skip_bad=False)
    assert strict(samples, 0, (0, 0, 0)).image is None and strict(samples, 1, (0, 0, 1)).image is not None


def test_collate_of_a_batch_without_images_keeps_the_target_shape():
    multi = L.collate([L.Item(None, torch.zeros(5, dtype=torch.uint8), ("x.jpg: bad",))])
    assert multi.images.shape == (0, 3, 0, 0) and multi.targets.shape == (0, 5) and multi.errors == ("x.jpg: bad",)
    single = L.collate([L.Item(None, 3, ("y.jpg: bad",))])
    assert single.targets.shape == (0,) and single.targets.dtype == torch.int64


def test_inference_workers_leave_the_models_cores_to_its_threads(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(L, "default_workers", lambda: 8)  # an 8-core allocation, whatever this machine has
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(6)
        assert L.inference_workers(torch.device("cpu")) == 2  # the cores torch's threads leave free
        torch.set_num_threads(8)
        assert L.inference_workers(torch.device("cpu")) == 0  # none: the batch decodes between forward passes
        assert L.inference_workers(torch.device("cuda")) == 8  # the model is elsewhere: every core decodes
    finally:
        torch.set_num_threads(threads)


class _ThreadOf:
    """A view that records the thread it ran in (picklable for worker processes)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, img: np.ndarray) -> np.ndarray:
        import threading

        self.seen.append(threading.current_thread().name)
        return np.ascontiguousarray(img[:8, :8])


def test_eval_batches_decode_in_threads_in_the_main_process_same_items_in_order(photo_tree):
    paths = sorted(photo_tree.glob("*/*.jpg"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        view = _ThreadOf()
        threaded = list(L.make_loader(L.EvalFiles(paths, view), 4, workers=0))
        assert view.seen and all(name.startswith("bitlab-decode") for name in view.seen)
        torch.set_num_threads(1)  # one core for the model: one by one, in the main thread
        view = _ThreadOf()
        serial = list(L.make_loader(L.EvalFiles(paths, view), 4, workers=0))
        assert set(view.seen) == {"MainThread"}
    finally:
        torch.set_num_threads(threads)
    assert [len(b.images) for b in threaded] == [4, 2]
    for a, b in zip(threaded, serial):
        assert torch.equal(a.images, b.images)
    # In loader workers (processes) each item is read in turn: the batch comes out the same.
    in_workers = list(L.make_loader(L.EvalFiles(paths, _ThreadOf()), 4, workers=2))
    assert all(torch.equal(a.images, b.images) for a, b in zip(in_workers, serial))


def test_default_workers_share_the_cores_among_a_nodes_processes(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = L.default_workers()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(alone))
    assert alone >= 1 and L.default_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * alone))
    assert L.default_workers() == 1  # never none
