"""Tar shards: the same examples come out as went in; streams are seeded, split and resumable."""
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bitlab.cli import main
from bitlab.data import shards
from bitlab.data.datasets import ImageSet, image_folder
from bitlab.data.multilabel import read_multilabel
from bitlab.data.transforms import decode_image_bytes
from bitlab.errors import BitlabError


@pytest.fixture(scope="module")
def tree(photos, tmp_path_factory) -> Path:
    """Real photo crops, JPEG and PNG: `train/<photo>/<n>.{jpg,png}` (4 classes x 5) and `val/` (x 2)."""
    root = tmp_path_factory.mktemp("shard_src")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for name, img in photos.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = img.shape[:2]
                t, l = rng.integers(0, h // 3), rng.integers(0, w // 3)
                crop = cv2.resize(img[t:t + h // 2, l:l + w // 2], (40, 30), interpolation=cv2.INTER_AREA)
                ext = "png" if i % 3 == 0 else "jpg"
                cv2.imwrite(str(folder / f"{i}.{ext}"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return root


def all_samples(index):
    return [s for i in range(len(index.shards)) for s in shards.iter_shard(index.path(i))]


def test_round_trip_same_examples_out_as_in(tree, tmp_path):
    images = image_folder(tree / "train")
    index = shards.write_shards(images, tmp_path / "s", shard_size=6, progress=False)
    assert [s.count for s in index.shards] == [6, 6, 6, 2] and index.num_samples == 20
    assert index.classes == images.classes and not index.multi_label
    assert index.label_counts == [5, 5, 5, 5]
    seen = {}
    for sample in all_samples(shards.read_index(tmp_path / "s")):
        meta = json.loads(sample.fields["json"])
        seen[meta["path"]] = (sample, meta)
    assert len(seen) == len(images)
    for path, label in zip(images.paths, images.labels):
        sample, meta = seen[str(path.relative_to(tree / "train"))]
        name, data = sample.image()
        assert data == path.read_bytes()  # the file's bytes, not re-encoded
        assert name.endswith(path.suffix) and sample.labels() == [int(label)] == meta["labels"]
        assert int(sample.fields["cls"]) == label
        assert decode_image_bytes(data, name).shape == (30, 40, 3)
    # shuffled when written: classes are mixed within the first shard
    first = [s.labels()[0] for s in shards.iter_shard(index.path(0))]
    assert len(set(first)) > 1


def test_writing_is_deterministic_and_seeded(tree, tmp_path):
    images = image_folder(tree / "train")
    a = shards.write_shards(images, tmp_path / "a", shard_size=8, seed=3, progress=False)
    b = shards.write_shards(images, tmp_path / "b", shard_size=8, seed=3, progress=False)
    c = shards.write_shards(images, tmp_path / "c", shard_size=8, seed=4, progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]
    order = [json.loads(s.fields["json"])["path"] for s in all_samples(a)]
    plain = shards.write_shards(images, tmp_path / "d", shard_size=8, shuffle=False, progress=False)
    in_order = [json.loads(s.fields["json"])["path"] for s in all_samples(plain)]
    assert sorted(order) == sorted(in_order) and order != in_order
    assert in_order == [str(p.relative_to(tree / "train")) for p in images.paths]


def test_rewrite_keeps_complete_shards(tree, tmp_path):
    images = image_folder(tree / "train")
    first = shards.write_shards(images, tmp_path / "s", shard_size=6, progress=False)
    kept = tmp_path / "s" / first.shards[0].name
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "s" / first.shards[2].name).unlink()  # as if interrupted before that shard
    (tmp_path / "s" / shards.INDEX).unlink()
    again = shards.write_shards(images, tmp_path / "s", shard_size=6, progress=False)
    assert kept.stat().st_mtime_ns == stamp  # not rewritten
    assert again.to_dict() == first.to_dict()
    assert shards.verify(again) == []


def test_size_cap(tree, tmp_path):
    images = image_folder(tree / "train")
    biggest = max(p.stat().st_size for p in images.paths)
    index = shards.write_shards(images, tmp_path / "s", shard_size=100, max_bytes=3 * (biggest + 1536),
                                progress=False)
    cap = 3 * (biggest + 1536)
    assert len(index.shards) > 1 and index.num_samples == len(images)
    for i in range(len(index.shards)):
        samples = shards.read_shard(index.path(i))
        assert sum(len(s.image()[1]) + 1536 for s in samples) <= cap


def test_multilabel_round_trip(tree, tmp_path):
    rows = [{"path": f"train/chelsea/{i}.{'png' if i % 3 == 0 else 'jpg'}", "labels": labels}
            for i, labels in enumerate([["cat"], ["cat", "sofa"], [], ["sofa", "lamp", "cat"], ["lamp"]])]
    jsonl = tree / "multi.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = read_multilabel(jsonl)["all"]
    index = shards.write_shards(images, tmp_path / "m", shard_size=2, progress=False)
    assert index.multi_label and index.classes == ["cat", "lamp", "sofa"] and index.label_counts == [3, 2, 2]
    got = {json.loads(s.fields["json"])["path"]: s for s in all_samples(index)}
    for path, labels in zip(images.paths, images.labels):
        sample = got[str(path.relative_to(tree / "train" / "chelsea"))]
        assert "cls" not in sample.fields and sample.labels() == labels.tolist()
        assert sample.image()[1] == path.read_bytes()


def test_cli_writes_one_set_per_split(tree, tmp_path, capsys):
    assert main(["shards", "--data", str(tree), "--out", str(tmp_path / "out"), "--shard-size", "4", "--verify",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train: 20 images, 4 classes (single-label) in 5 shard(s)" in out and "val: 8 images" in out
    train, val = shards.read_index(tmp_path / "out" / "train"), shards.read_index(tmp_path / "out" / "val")
    assert train.classes == val.classes
    assert main(["shards", "--data", str(tree), "--out", str(tmp_path / "t"), "--split", "train", "--no-progress"]) == 0
    assert shards.read_index(tmp_path / "t").num_samples == 20
    assert main(["shards", "--data", str(tree / "nothing"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "nothing: no such dataset folder" in capsys.readouterr().err


def test_bad_shards_are_named(tree, tmp_path):
    index = shards.write_shards(image_folder(tree / "train"), tmp_path / "s", shard_size=6, progress=False)
    path = index.path(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(shards.ShardError, match=rf"{path.name}.*(unreadable|samples)"):
        shards.read_shard(path, index.shards[1].count)
    assert any(path.name in p for p in shards.verify(index))
    path.unlink()
    with pytest.raises(shards.ShardError, match=rf"missing.*{path.name}"):
        shards.read_index(tmp_path / "s")
    with pytest.raises(shards.ShardError, match="not a shard set"):
        shards.read_index(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / shards.INDEX).write_text('{"format": "other"}')
    with pytest.raises(shards.ShardError, match="not a bitlab shard index"):
        shards.read_index(tmp_path / "y")


def test_missing_source_file_is_named_before_writing(tree, tmp_path):
    images = image_folder(tree / "train")
    paths = list(images.paths)
    paths[3] = tree / "gone.jpg"
    images = ImageSet(paths, images.labels, images.classes, images.source)
    with pytest.raises(BitlabError, match="gone.jpg"):
        shards.write_shards(images, tmp_path / "s", progress=False)
    assert not list((tmp_path / "s").glob("*.tar"))


def test_undecodable_image_is_named_while_packing(tree, tmp_path, capsys):
    """Refused by default, naming the source file (not shard.tar:key at training time); or left out."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tree / "train", data)
    bad = data / "coffee" / "1.jpg"
    bad.write_bytes(b"not an image\n")
    argv = ["shards", "--data", str(data), "--shard-size", "6", "--no-progress", "--verify"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot decode image" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert not (tmp_path / "s" / shards.INDEX).exists()

    assert main([*argv, "--out", str(tmp_path / "s"), "--skip-bad-images"]) == 0
    assert "left out 1 image(s) that do not decode" in capsys.readouterr().out
    index = shards.read_index(tmp_path / "s")
    assert index.skipped == [str(bad)] and index.num_samples == 19 and sum(index.label_counts) == 19
    assert index.label_counts[index.classes.index("coffee")] == 4
    assert all(decode_image_bytes(s.image()[1], s.name) is not None for s in all_samples(index))


@pytest.mark.parametrize("flags, message", [
    (["--max-shard-mb", "-1"], "--max-shard-mb must be positive, got -1"),
    (["--max-shard-mb", "0"], "--max-shard-mb must be positive, got 0"),
    (["--shard-size", "0"], "--shard-size must be positive, got 0"),
])
def test_shard_limits_are_refused_before_writing(tree, tmp_path, capsys, flags, message):
    assert main(["shards", "--data", str(tree), "--out", str(tmp_path / "s"), "--no-progress", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sample_without_image_or_labels(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.txt", b"x"), ("b.jpg", b"y"), ("b.cls", b"oops")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    a, b = shards.read_shard(path)
    with pytest.raises(shards.ShardError, match=r"odd.tar:a: no image member"):
        a.image()
    with pytest.raises(shards.ShardError, match=r"odd.tar:b: no readable labels"):
        b.labels()


# ----------------------------------------------------------------------------- streams
def _stream(index, **kw):
    return shards.ShardStream(index, lambda samples, j, key: (samples[j].key, key), seed=7, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_stream_epochs_cover_every_sample_once_over_readers(tree, tmp_path):
    index = shards.write_shards(image_folder(tree / "train"), tmp_path / "s", shard_size=3, progress=False)  # 7 shards
    streams = [iter(_stream(index, rank=r, world_size=2)) for r in range(2)]
    for epoch in range(3):
        keys = []
        for r, it in enumerate(streams):
            mine = [index.shards[s].count for s in _stream(index, rank=r, world_size=2).shards_of(r, epoch)]
            got = _take(it, sum(mine))
            assert {k[0] for _, k in got} == {epoch}
            keys += [key for key, _ in got]
        assert sorted(keys) == sorted(s.key for s in all_samples(index))
    # a new shuffle each epoch, and per seed
    s = _stream(index)
    assert list(s.shards_of(0, 0)) != list(s.shards_of(0, 1))
    first = [k for k, _ in _take(iter(_stream(index)), 20)]
    assert first == [k for k, _ in _take(iter(_stream(index)), 20)]
    other = shards.ShardStream(index, lambda samples, j, key: samples[j].key, seed=8)
    assert first != _take(iter(other), 20)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
@pytest.mark.parametrize("workers, micro_steps, start", [(0, 2, 5), (2, 2, 5), (3, 1, 7), (3, 2, 4)])
def test_stream_resumes_exactly_through_a_dataloader(tree, tmp_path, workers, micro_steps, start):
    index = shards.write_shards(image_folder(tree / "train"), tmp_path / "s", shard_size=3, progress=False)
    micro = 2

    def batches(start_step, n):
        stream = shards.ShardStream(index, lambda samples, j, key: torch.tensor(int(samples[j].key)), seed=1,
                                    rank=1, world_size=2, workers=workers, micro_batch=micro,
                                    micro_steps=micro_steps, start_step=start_step)
        it = iter(DataLoader(stream, batch_size=micro, num_workers=workers))
        return [next(it).tolist() for _ in range(n)]

    full = batches(0, 30)
    first = start * micro_steps  # the first batch of step `start`
    assert batches(start, 30 - first) == full[first:]


def test_reader_layout():
    assert shards.reader_layout(16, 2, 8) == 8
    assert shards.reader_layout(5, 2, 8) == 2  # every reader needs a shard per epoch
    with pytest.raises(shards.ShardError, match="cannot feed 4 processes"):
        shards.reader_layout(3, 4, 1)


def test_pass_reads_each_sample_once_over_ranks_and_workers(tree, tmp_path):
    index = shards.write_shards(image_folder(tree / "train"), tmp_path / "s", shard_size=3, progress=False)
    keys = []
    for rank in range(2):
        ds = shards.ShardPass(index, lambda s: int(s.key), rank=rank, world_size=2)
        keys += [k for b in DataLoader(ds, batch_size=4, num_workers=2) for k in b.tolist()]
    assert sorted(keys) == sorted(int(s.key) for s in all_samples(index))


# ----------------------------------------------------------------------------- foreign shards
def _foreign_tar(path: Path, members) -> None:
    """A tar as other tools write it (Python's tarfile, default format and padding), not bitlab's writer."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))


def _read_back(index):
    """(key, image bytes, labels) of every sample, through the training and evaluation readers."""
    passed = list(shards.ShardPass(index, lambda s: (s.key, s.image()[1], s.labels())))
    stream = iter(shards.ShardStream(index, lambda samples, j, key: (samples[j].key, samples[j].image()[1],
                                                                     samples[j].labels()), seed=0))
    streamed = [next(stream) for _ in range(index.num_samples)]  # one epoch
    assert sorted(streamed) == sorted(passed)
    return passed


def test_foreign_single_label_shards_are_indexed_and_read_back(tree, tmp_path):
    files = sorted((tree / "train").rglob("*.*"))
    classes = sorted(p.name for p in (tree / "train").iterdir())
    out = tmp_path / "wds"
    out.mkdir()
    expected = []
    for s, chunk in enumerate((files[:7], files[7:15], files[15:])):
        members = []
        for i, f in enumerate(chunk):
            key, label = f"{s}/{i:05d}", classes.index(f.parent.name)
            members.append((f"{key}{f.suffix}", f.read_bytes()))
            if s == 0:  # webdataset ShardWriter's `cls`
                members.append((f"{key}.cls", f"{label}\n".encode()))
            elif s == 1:  # a .json with a "label" integer (and other fields)
                members.append((f"{key}.json", json.dumps({"label": label, "caption": "x"}).encode()))
            else:  # img2dataset: metadata .json without labels, and the label in .cls
                members += [(f"{key}.json", json.dumps({"url": "http://x", "status": "success"}).encode()),
                            (f"{key}.cls", str(label).encode()), (f"{key}.txt", b"a caption")]
            expected.append((key, f.read_bytes(), [label]))
        _foreign_tar(out / f"data-{s:06d}.tar", members)
    _foreign_tar(out / "other.tar", [("z.jpg", b"not matched by the pattern")])

    index = shards.index_shards(out, pattern="data-*.tar", progress=False)
    assert [s.name for s in index.shards] == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert [s.count for s in index.shards] == [7, 8, 5] and not index.multi_label
    assert index.classes == ["0", "1", "2", "3"] and index.label_counts == [5, 5, 5, 5]
    for i, s in enumerate(index.shards):  # hashed in the reading pass, padding included
        assert s.sha256 == shards.fileio.sha256_file(index.path(i)) and s.bytes == index.path(i).stat().st_size
    again = shards.read_index(out)
    assert again.to_dict() == index.to_dict() and shards.verify(again) == []
    assert sorted(_read_back(again)) == sorted(expected)


def test_foreign_multilabel_shards_through_the_cli(tree, tmp_path, capsys):
    files = sorted((tree / "train").rglob("*.jpg"))[:6]
    labels = [[0, 2], [], [1], [2, 1, 0], [2], [0]]
    out = tmp_path / "wds"
    out.mkdir()
    for s in range(2):
        _foreign_tar(out / f"shard{s}.tar", [m for i in range(3 * s, 3 * s + 3) for m in (
            (f"k{i}.jpg", files[i].read_bytes()), (f"k{i}.json", json.dumps({"labels": labels[i]}).encode()))])
    (tmp_path / "classes.txt").write_text("cat\nlamp\nsofa\n")
    assert main(["shards-index", str(out), "--classes", str(tmp_path / "classes.txt"), "--multi-label",
                 "--no-progress"]) == 0
    assert "6 images, 3 classes (multi-label) in 2 shard(s)" in capsys.readouterr().out
    index = shards.read_index(out)
    assert index.multi_label and index.classes == ["cat", "lamp", "sofa"] and index.label_counts == [3, 2, 3]
    assert sorted(_read_back(index)) == sorted((f"k{i}", files[i].read_bytes(), labels[i]) for i in range(6))
    # the same tars as a single-label set: refused, naming the first sample with two labels
    (out / shards.INDEX).unlink()
    assert main(["shards-index", str(out), "--num-classes", "3", "--no-progress"]) == 2
    assert "shard0.tar:k0: 2 labels [0, 2] in a single-label set (--multi-label" in capsys.readouterr().err
    assert not (out / shards.INDEX).exists()


JPG = b"\xff\xd8 some jpeg"


@pytest.mark.parametrize("members, flags, message", [
    ([("a.jpg", JPG), ("a.cls", b"0"), ("b.jpg", JPG)], {}, r"data-1.tar:b: no readable labels"),
    ([("b.jpg", JPG), ("b.png", JPG), ("b.cls", b"0")], {}, r"data-1.tar:b: 2 image members"),
    ([("b.txt", b"x"), ("b.cls", b"0")], {}, r"data-1.tar:b: 0 image members.*found .cls, .txt"),
    ([("b.jpg", JPG), ("b.cls", b"5")], {"classes": ["x", "y"]}, r"data-1.tar:b: label 5 out of range for 2 classes"),
    ([("b.jpg", JPG), ("b.cls", b"-1")], {}, r"data-1.tar:b: label -1 out of range"),
    ([("b.jpg", JPG), ("b.json", b'{"labels": ["cat"]}')], {}, r"data-1.tar:b: no readable labels"),
    ([("b.jpg", JPG), ("b.jpg", JPG), ("b.cls", b"0")], {}, r"data-1.tar:b.jpg: member appears twice"),
    ([("b.jpg", JPG), ("b.cls", b"0"), ("c.jpg", JPG), ("c.cls", b"0"), ("b.jpg", JPG), ("b.cls", b"0")], {},
     r"data-1.tar:b: a second sample with this key"),
    ([], {}, r"data-1.tar: no samples"),
    (b"not a tar at all", {}, r"data-1.tar: unreadable tar shard"),
])
def test_bad_foreign_shards_are_named(tmp_path, members, flags, message):
    _foreign_tar(tmp_path / "data-0.tar", [("a.jpg", JPG), ("a.cls", b"1")])
    if isinstance(members, bytes):
        (tmp_path / "data-1.tar").write_bytes(members)
    else:
        _foreign_tar(tmp_path / "data-1.tar", members)
    with pytest.raises(shards.ShardError, match=message):
        shards.index_shards(tmp_path, progress=False, **flags)
    assert not (tmp_path / shards.INDEX).exists()


def test_index_refuses_an_indexed_folder_and_an_empty_match(tree, tmp_path):
    shards.write_shards(image_folder(tree / "train"), tmp_path / "s", shard_size=6, progress=False)
    with pytest.raises(shards.ShardError, match="already a shard set"):
        shards.index_shards(tmp_path / "s", progress=False)
    with pytest.raises(shards.ShardError, match=r"no files match 'x-\*.tar'"):
        shards.index_shards(tmp_path, pattern="x-*.tar", progress=False)
    with pytest.raises(shards.ShardError, match="not a path"):
        shards.index_shards(tmp_path, pattern="s/*.tar", progress=False)
