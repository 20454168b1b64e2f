"""Image sets from folders, CSVs and make-ooc manifests; few-shot picks."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from bitlab.data import datasets as ds
from bitlab.errors import BitlabError


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def photo_tree(tmp_path, photos) -> Path:
    """train/{cat,coffee}/ and val/{cat,coffee}/ from real photos (crops of them)."""
    root = tmp_path / "photos"
    for split, n in (("train", 4), ("val", 2)):
        for name, key in (("cat", "chelsea"), ("coffee", "coffee")):
            for i in range(n):
                _write(root / split / name / f"{i}.jpg", photos[key][i * 10:, i * 10:])
    return root


def test_digits_builtin(digits_root):
    splits = ds.load_splits(digits_root)
    assert splits.classes == [str(d) for d in range(10)]
    assert len(splits.train) == 1797 - 360 and len(splits.val) == 360
    assert (splits.val.class_counts() == 36).all()
    img = cv2.imread(str(splits.train.paths[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (8, 8) and img.max() > 200  # real scans, scaled from 0-16 to 0-255
    assert ds.write_digits(digits_root.parent) == digits_root  # written once, then reused


def test_a_tree_another_process_finished_first_is_kept(tmp_path):
    """Two writers of one built-in tree (few-shot runs side by side, first use): the second to finish
    drops its copy and leaves the first's in place, which its readers may be using; a partial tree
    (no `.complete`) is replaced."""
    def tree(name: str, marker: str) -> Path:
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "train" / "x.png").write_text(marker)
        (tmp_path / name / ".complete").write_text("done\n")
        return tmp_path / name

    dest = tmp_path / "digits"
    ds.publish_tree(tree("first", "first"), dest)
    ds.publish_tree(tree("second", "second"), dest)
    assert (dest / "train" / "x.png").read_text() == "first" and not (tmp_path / "second").exists()
    (dest / ".complete").unlink()  # as an interrupted writer leaves it
    ds.publish_tree(tree("third", "third"), dest)
    assert (dest / "train" / "x.png").read_text() == "third" and not (tmp_path / "third").exists()


def test_image_folder_splits_and_labels(photo_tree):
    splits = ds.load_splits(photo_tree)
    assert splits.classes == ["cat", "coffee"]
    assert [p.parent.name for p in splits.train.paths] == ["cat"] * 4 + ["coffee"] * 4
    assert splits.train.labels.tolist() == [0] * 4 + [1] * 4
    assert len(splits.val) == 4


def test_test_folder_is_used_when_there_is_no_val(photo_tree):
    (photo_tree / "val").rename(photo_tree / "test")
    assert len(ds.load_splits(photo_tree).val) == 4


def test_missing_val_split_is_a_clear_error(photo_tree):
    import shutil
    shutil.rmtree(photo_tree / "val")
    with pytest.raises(BitlabError, match=r"no validation split.*--val-fraction"):
        ds.load_splits(photo_tree)
    splits = ds.load_splits(photo_tree, val_fraction=0.25, seed=1)
    assert len(splits.train) == 6 and len(splits.val) == 2
    assert not set(splits.train.paths) & set(splits.val.paths)
    assert (splits.val.class_counts() == 1).all()
    assert splits.val.paths == ds.load_splits(photo_tree, val_fraction=0.25, seed=1).val.paths


def test_class_missing_from_val(photo_tree):
    import shutil
    shutil.rmtree(photo_tree / "val" / "coffee")
    with pytest.raises(BitlabError, match=r"no validation images for class\(es\) 'coffee'"):
        ds.load_splits(photo_tree)


def test_val_class_unknown_to_train(photo_tree, photos):
    _write(photo_tree / "val" / "rocket" / "0.jpg", photos["rocket"])
    with pytest.raises(BitlabError, match=r"'rocket' are not in the training set"):
        ds.load_splits(photo_tree)


def test_csv_with_split_column(tmp_path, photos):
    for i in range(3):
        _write(tmp_path / "img" / f"a{i}.png", photos["chelsea"][:50, :50])
        _write(tmp_path / "img" / f"b{i}.png", photos["rocket"][:50, :50])
    rows = ["path,label,split"] + [f"img/a{i}.png,cat,{'val' if i == 2 else 'train'}" for i in range(3)] + \
        [f"img/b{i}.png,rocket,{'val' if i == 2 else 'train'}" for i in range(3)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    splits = ds.load_splits(tmp_path / "data.csv")
    assert splits.classes == ["cat", "rocket"]
    assert [p.name for p in splits.train.paths] == ["a0.png", "a1.png", "b0.png", "b1.png"]
    assert [p.name for p in splits.val.paths] == ["a2.png", "b2.png"]
    assert splits.train.paths[0] == tmp_path / "img" / "a0.png"  # relative to the CSV


@pytest.mark.parametrize("text, message", [
    ("file,target\na.png,x\n", r"no label column"),
    ("label\nx\n", r"no image path column"),
    ("path,label\na.png,x\n,y\n", r"line 3: empty 'path'"),
])
def test_bad_csv_names_the_problem(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(BitlabError, match=message):
        ds.load_source(tmp_path / "bad.csv")


def test_make_ooc_manifest(tmp_path, photos):
    out = tmp_path / "ooc"
    rows = ["file,sha256,class,ilsvrc_indices"]
    for cls, key in (("Cat", "chelsea"), ("Rocket", "rocket")):
        for i in range(3):
            _write(out / cls / f"{i}.png", photos[key][i * 5:100, :100])
            rows.append(f"{cls}/{i}.png,0,{cls},0")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    sets = ds.load_source(out)
    assert list(sets) == ["all"] and sets["all"].classes == ["Cat", "Rocket"] and len(sets["all"]) == 6
    splits = ds.load_splits(out, val_fraction=0.34, seed=0)
    assert len(splits.train) == 4 and len(splits.val) == 2


def test_unknown_source(tmp_path):
    with pytest.raises(BitlabError, match="no such dataset"):
        ds.load_source(tmp_path / "nope")
    with pytest.raises(BitlabError, match="unknown built-in"):
        ds.load_source("builtin:imagenet")


def test_few_shot_is_seeded_and_without_replacement(digits_root):
    train = ds.load_splits(digits_root).train
    a, b = ds.few_shot(train, 5, seed=3), ds.few_shot(train, 5, seed=3)
    assert a.paths == b.paths  # same seed, same files
    assert len(set(a.paths)) == 50 and (a.class_counts() == 5).all()
    assert a.paths != ds.few_shot(train, 5, seed=4).paths
    for path, label in zip(a.paths, a.labels):
        assert path.parent.name == a.classes[label]


def test_few_shot_needs_enough_examples(photo_tree):
    train = ds.load_splits(photo_tree).train
    with pytest.raises(BitlabError, match=r"class 'cat' has 4 training image\(s\), fewer than examples_per_class 5"):
        ds.few_shot(train, 5, seed=0)


def test_typical_image_size(photo_tree):
    h, w = ds.typical_image_size(ds.load_splits(photo_tree).train)
    assert 250 <= h <= 400 and 380 <= w <= 600


def _csv_set(tmp_path, photos, n: int = 3) -> Path:
    """img/a{i}.png (cat) and img/b{i}.png (rocket), real photo crops."""
    for i in range(n):
        _write(tmp_path / "img" / f"a{i}.png", photos["chelsea"][:50, :50])
        _write(tmp_path / "img" / f"b{i}.png", photos["rocket"][:50, :50])
    return tmp_path


def test_missing_files_are_named_with_their_lines_at_load_time(tmp_path, photos):
    _csv_set(tmp_path, photos)
    rows = ["path,label", "img/a0.png,cat", "img/gone.png,cat", "img/b0.png,rocket", "/nowhere/x.png,rocket"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(BitlabError) as e:
        ds.load_source(tmp_path / "data.csv")
    message = str(e.value)
    assert f"data.csv, line 3: file {tmp_path / 'img' / 'gone.png'} not found" in message
    assert "data.csv, line 5: file /nowhere/x.png not found" in message
    assert "line 2" not in message and "line 4" not in message
    # many: the first 20 by line, then a count
    (tmp_path / "many.csv").write_text("path,label\n" + "".join(f"img/no{i}.png,cat\n" for i in range(25)))
    with pytest.raises(BitlabError, match=r"25 of the 25 files") as e:
        ds.load_source(tmp_path / "many.csv")
    assert "line 21: file" in str(e.value) and "line 22: file" not in str(e.value)
    assert str(e.value).endswith("... and 5 more")


@pytest.mark.parametrize("split, line", [("Train ", None), ("validation", None), ("dev", 3), ("", 3)])
def test_csv_split_values(tmp_path, photos, split, line):
    """train/val/validation/test only ('validation' is val); a blank beside 'train' rows is refused."""
    _csv_set(tmp_path, photos)
    rows = ["path,label,split", "img/a0.png,cat,train", f"img/a1.png,cat,{split}", "img/b0.png,rocket,train",
            "img/a2.png,cat,val", "img/b2.png,rocket,val"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    if line is not None:
        with pytest.raises(BitlabError, match=rf"data.csv, line {line}: (unknown split 'dev'|empty 'split')"):
            ds.load_source(tmp_path / "data.csv")
        return
    splits = ds.load_splits(tmp_path / "data.csv")
    expected_train = ["a0.png", "a1.png", "b0.png"] if split.strip() == "Train" else ["a0.png", "b0.png"]
    assert [p.name for p in splits.train.paths] == expected_train
    expected_val = ["a2.png", "b2.png"] if split.strip() == "Train" else ["a1.png", "a2.png", "b2.png"]
    assert [p.name for p in splits.val.paths] == expected_val  # 'validation' rows join 'val', not dropped
    assert len(ds.load_splits(tmp_path / "data.csv", val_split="validation").val) == len(expected_val)


def test_csv_without_train_rows_trains_on_the_blank_ones(tmp_path, photos):
    _csv_set(tmp_path, photos)
    rows = ["path,label,split", "img/a0.png,cat,", "img/a1.png,cat,", "img/b0.png,rocket,", "img/b1.png,rocket,",
            "img/a2.png,cat,test", "img/b2.png,rocket,test"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    splits = ds.load_splits(tmp_path / "data.csv")
    assert len(splits.train) == 4 and len(splits.val) == 2


def test_csv_header_with_spaces_and_excel_bom(tmp_path, photos):
    _csv_set(tmp_path, photos)
    body = "img/a0.png , cat , train\nimg/b0.png,rocket,train\nimg/a1.png,cat,val\nimg/b1.png,rocket,val\n"
    (tmp_path / "spaces.csv").write_text(" path , label , split \n" + body)
    (tmp_path / "bom.csv").write_bytes("path,label,split\n".encode("utf-8-sig") + body.encode())
    for name in ("spaces.csv", "bom.csv"):
        splits = ds.load_splits(tmp_path / name)
        assert [p.name for p in splits.train.paths] == ["a0.png", "b0.png"] and splits.classes == ["cat", "rocket"]


def test_empty_class_folder_is_reported(photo_tree, caplog):
    (photo_tree / "train" / "dog").mkdir()
    with caplog.at_level("WARNING", logger="bitlab.data.datasets"):
        train = ds.image_folder(photo_tree / "train")
    assert train.classes == ["cat", "coffee"]
    assert "no images in class folder 'dog'" in caplog.text and str(photo_tree / "train") in caplog.text


def test_packed_paths_behave_as_a_list_and_hold_no_path_objects(tmp_path):
    """Forked loader workers must not touch per-path Python objects (their reference counts would
    copy the parent's pages into every worker): the set keeps two arrays, and reads back exactly."""
    import gc

    from bitlab.data.datasets import ImageSet, PackedPaths

    names = [tmp_path / f"class {i % 3}" / f"ünï_{i}.jpg" for i in range(1000)]
    images = ImageSet(names, [i % 3 for i in range(1000)], ["a", "b", "c"])
    assert isinstance(images.paths, PackedPaths) and len(images.paths) == 1000
    assert list(images.paths) == names and images.paths[-1] == names[-1] and images.paths == names
    assert images.subset([5, 7]).paths == [names[5], names[7]]
    with pytest.raises(IndexError):
        images.paths[1000]
    held = gc.get_referents(*gc.get_referents(images.paths))  # what the packed form refers to
    assert not any(isinstance(x, (Path, list)) for x in held)
    assert {type(x) for x in vars(images.paths).values()} == {np.ndarray}
