"""Multi-label CSV / JSON-lines sets: parsing, class lists, splits and errors that name the line."""
import json
from pathlib import Path

import numpy as np
import pytest

from bitlab.data.multilabel import (
    MultiLabelSet, is_multilabel_file, load_labelled, random_holdout, read_classes, read_multilabel,
)
from bitlab.errors import BitlabError


def touch(folder: Path, *names: str) -> None:
    """Empty files: reading a list checks that its files exist, not what they hold."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def test_csv_with_splits_and_empty_labels(tmp_path):
    f = tmp_path / "labels.csv"
    elsewhere = tmp_path / "elsewhere" / "c.png"
    touch(tmp_path, "a.jpg", "sub/b.jpg", "elsewhere/c.png")
    f.write_text(f"path,labels,split\na.jpg,cat dog,train\nsub/b.jpg,,train\n{elsewhere},dog,val\n")
    assert is_multilabel_file(f)
    sets = read_multilabel(f)
    train, val = sets["train"], sets["val"]
    assert train.classes == val.classes == ["cat", "dog"]
    assert train.paths == [tmp_path / "a.jpg", tmp_path / "sub" / "b.jpg"] and val.paths == [elsewhere]  # absolute kept
    assert [x.tolist() for x in train.labels] == [[0, 1], []]
    assert train.multi_hot(0).tolist() == [1, 1] and train.multi_hot(1).tolist() == [0, 0]
    assert train.label_counts().tolist() == [1, 1]


def test_separator_and_class_list(tmp_path):
    f = tmp_path / "l.csv"
    touch(tmp_path, "a.jpg", "b.jpg")
    f.write_text("file,tags\na.jpg,tabby cat|sofa\n")
    assert read_multilabel(f, label_sep="|")["all"].classes == ["sofa", "tabby cat"]
    classes = tmp_path / "classes.txt"
    classes.write_text("tabby cat\nsofa\nlamp\n")
    s = read_multilabel(f, label_sep="|", classes=read_classes(classes))["all"]
    assert s.classes == ["tabby cat", "sofa", "lamp"] and s.labels[0].tolist() == [0, 1]
    f.write_text("file,tags\na.jpg,tabby cat|sofa\nb.jpg,chair\n")
    with pytest.raises(BitlabError, match=r"l.csv, line 3: label 'chair' is not in the class list"):
        read_multilabel(f, label_sep="|", classes=read_classes(classes))


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    touch(tmp_path, "x.jpg", "y.jpg")
    f.write_text(json.dumps({"path": "x.jpg", "labels": ["b", "a", "a"]}) + "\n\n"
                 + json.dumps({"path": "y.jpg", "labels": [], "split": "Val"}) + "\n")
    sets = read_multilabel(f)
    assert set(sets) == {"all", "val"} and sets["all"].labels[0].tolist() == [0, 1]  # duplicates collapse


@pytest.mark.parametrize("text, message", [
    ("path,labels\n,cat\n", r"line 2: empty 'path'"),
    ("image,labels\na.jpg,cat\n", r"no image path column"),
    ("path,label\na.jpg,cat\n", None),  # single-label CSV: not a multi-label file
])
def test_bad_csv(tmp_path, text, message):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    if message is None:
        assert not is_multilabel_file(f)
        return
    with pytest.raises(BitlabError, match=message):
        read_multilabel(f)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 1: not JSON"),
    ('["a.jpg"]', r"line 1: expected an object"),
    ('{"labels": ["a"]}', r"line 1: missing or empty 'path'"),
    ('{"path": "a.jpg", "labels": "cat"}', r"line 1: 'labels' must be a list"),
])
def test_bad_jsonl(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(BitlabError, match=message):
        read_multilabel(f)


def test_class_list_errors(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a\nb\na\n")
    with pytest.raises(BitlabError, match="'a' listed twice"):
        read_classes(f)
    f.write_text("\n")
    with pytest.raises(BitlabError, match="empty class list"):
        read_classes(f)


def test_holdout():
    s = MultiLabelSet([f"{i}.jpg" for i in range(10)], [[i % 3] for i in range(10)], ["a", "b", "c"])
    train, val = random_holdout(s, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert sorted(map(str, train.paths + val.paths)) == sorted(map(str, s.paths))
    assert random_holdout(s, 0.2, seed=0)[1].paths == val.paths


def test_load_labelled_aligns_single_label_splits(tmp_path):
    for split, classes in (("train", "abc"), ("val", "bc")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "0.png").write_bytes(b"")
    splits = load_labelled(tmp_path)
    assert splits["val"].classes == ["a", "b", "c"] and splits["val"].labels.tolist() == [1, 2]
    (tmp_path / "val" / "z").mkdir()
    (tmp_path / "val" / "z" / "0.png").write_bytes(b"")
    with pytest.raises(BitlabError, match="'z' are not among the 3 training classes"):
        load_labelled(tmp_path)
    assert np.array_equal(load_labelled(tmp_path / "train")["all"].labels, [0, 1, 2])


def test_missing_files_splits_and_short_rows_name_the_line(tmp_path):
    touch(tmp_path, "a.jpg", "b.jpg")
    f = tmp_path / "l.csv"
    f.write_text("path,labels\na.jpg,cat\nmissing.jpg,dog\nb.jpg,\n")
    with pytest.raises(BitlabError, match=r"l.csv, line 3: file .*missing.jpg not found"):
        read_multilabel(f)
    f.write_text("path,labels,split\na.jpg,cat,train\nb.jpg,dog,holdout\n")
    with pytest.raises(BitlabError, match=r"l.csv, line 3: unknown split 'holdout'"):
        read_multilabel(f)
    f.write_text("path,labels,split\na.jpg,cat,train\nb.jpg\n")
    with pytest.raises(BitlabError, match=r"l.csv, line 3: no 'labels' cell"):
        read_multilabel(f)
    f.write_text("path,labels,split\na.jpg,cat,train\nb.jpg,,validation\n")  # an empty cell: no labels
    assert read_multilabel(f)["val"].labels[0].tolist() == []
    j = tmp_path / "l.jsonl"
    j.write_text(json.dumps({"path": "a.jpg", "labels": ["cat"], "split": "train"}) + "\n"
                 + json.dumps({"path": "b.jpg", "labels": ["cat"]}) + "\n")
    with pytest.raises(BitlabError, match=r"l.jsonl, line 2: empty 'split'"):
        read_multilabel(j)


def test_csv_with_excel_bom_and_spaced_header(tmp_path):
    touch(tmp_path, "a.jpg")
    f = tmp_path / "l.csv"
    f.write_bytes(" path , labels \na.jpg,cat dog\n".encode("utf-8-sig"))
    assert is_multilabel_file(f)
    assert read_multilabel(f)["all"].labels[0].tolist() == [0, 1]


def test_labels_are_packed_and_read_back():
    from bitlab.data.multilabel import PackedLabels

    labels = [[0, 2], [], [1], [2, 1, 0]]
    s = MultiLabelSet([f"{i}.jpg" for i in range(4)], labels, ["a", "b", "c"])
    assert isinstance(s.labels, PackedLabels) and [x.tolist() for x in s.labels] == labels
    assert s.label_counts().tolist() == [2, 2, 2] and s.multi_hot(3).tolist() == [1, 1, 1]
    assert [x.tolist() for x in s.subset([3, 1]).labels] == [[2, 1, 0], []]
    with pytest.raises(ValueError):
        s.labels[0][0] = 5  # a view into the shared array: read-only
