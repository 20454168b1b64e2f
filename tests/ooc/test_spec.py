"""The specification files: the committed tables are valid, and bad ones get precise errors."""
from __future__ import annotations

import pytest

from bitlab.data import imagenet
from bitlab.errors import BitlabError
from bitlab.ooc import spec
from bitlab.paths import OOC_DATASET_DIR, SAMPLE_DIR

GOOD_CLASSES = (
    "name,folder,mid,ilsvrc_wnids,ilsvrc_indices,n_foregrounds\n"
    "Zebra,zebra,/m/0898b,n02391049,340,5\n"
    "Shark,shark,/m/0by6g,n01484850;n01491361;n01494475,2;3;4,4\n"
)


@pytest.mark.parametrize("path,count,total", [(OOC_DATASET_DIR / "classes.csv", 20, 81),
                                              (SAMPLE_DIR / "classes.csv", 8, 9)])
def test_committed_class_tables(path, count, total):
    classes = spec.load_classes(path)
    assert len(classes) == count
    assert sum(c.n_foregrounds for c in classes) == total  # paper F.1: 81 foregrounds
    index = imagenet.index_of()
    rows = {line: row for line, row in spec.read_table(path, ("ilsvrc_names",))}
    for c in classes:
        assert [index[w] for w in c.ilsvrc_wnids] == list(c.ilsvrc_indices)
        # the human-readable column agrees with the ILSVRC-2012 names
        assert rows[c.line]["ilsvrc_names"].split(";") == [imagenet.names()[i] for i in c.ilsvrc_indices]


def test_sample_classes_are_the_papers_own_rows():
    """The sample's class table is ooc_dataset/classes.csv's rows for the classes it holds, so its
    images are scored exactly as the full set's."""
    full = {c.folder: c for c in spec.load_classes(OOC_DATASET_DIR / "classes.csv")}
    sample = spec.load_classes(SAMPLE_DIR / "classes.csv")
    assert {c.folder for c in sample} == {"zebra", "sea_lion", "penguin", "ostrich", "tiger", "teddy_bear", "tank",
                                          "lighthouse"}
    for c in sample:
        f = full[c.folder]
        assert (c.name, c.mid, c.ilsvrc_indices) == (f.name, f.mid, f.ilsvrc_indices)
    assert {c.folder: c.n_foregrounds for c in sample}["tank"] == 2  # a Stryker and a Bradley


def test_committed_background_categories():
    cats = spec.load_background_categories(OOC_DATASET_DIR / "backgrounds.csv")
    assert len(cats) == 41  # paper F.1
    names = {c.category for c in cats}
    assert {"grass", "wood", "street_at_night", "underwater", "kitchen"} <= names  # the five the paper names
    sample = spec.load_background_categories(SAMPLE_DIR / "background_categories.csv")
    assert {c.category for c in sample} <= names
    # Where an object is usually seen: named, so that those pairs can be told apart or left out.
    folders = {c.folder for c in spec.load_classes(OOC_DATASET_DIR / "classes.csv")}
    by_cat = {c.category: set(c.usual_for) for c in cats}
    assert set().union(*by_cat.values()) <= folders
    assert "traffic_light" in by_cat["street_at_night"] and "shark" in by_cat["underwater"]  # the paper's own
    n_usual = sum(len(v) for v in by_cat.values())
    assert 0 < n_usual < 0.05 * len(cats) * len(folders)  # the rest, over 95% of the pairs, are out of context


def test_background_usual_for_must_name_folders(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("category,search_terms,usual_for\ngrass,lawn,zebra;../x\n")
    with pytest.raises(spec.SpecError, match=r"b.csv line 2: field 'usual_for' must list class folders"):
        spec.load_background_categories(p)


@pytest.mark.parametrize("old,new,message", [
    ("ilsvrc_indices,", "indices,", "missing column(s) ilsvrc_indices"),
    ("Zebra,zebra,/m/0898b,n02391049,340", "Zebra,zebra,/m/0898b,n02391049,341",
     "line 2: field 'ilsvrc_indices': 341 disagrees with n02391049, whose ILSVRC-2012 index is 340"),
    ("n02391049,340", "n99999999,340", "line 2: field 'ilsvrc_wnids': 'n99999999' is not an ILSVRC-2012 wnid"),
    ("2;3;4", "2;3", "line 3: 3 wnid(s) in 'ilsvrc_wnids' but 2 index(es)"),
    ("Shark,shark,", "Shark,zebra,", "line 3: field 'folder' 'zebra' repeats line 2"),
    ("Shark,shark,/m/0by6g", "Shark,shark,/m/0898b", "line 3: field 'mid' '/m/0898b' repeats line 2"),
    ("Shark,shark,", "Shark,../shark,", "line 3: field 'folder' must be a plain folder name"),
    ("/m/0by6g", "m0by6g", "line 3: field 'mid' must look like /m/0abc12"),
    ("Zebra,", ",", "line 2: field 'name' is empty"),
    ("340,5", "340,five", "line 2: field 'n_foregrounds' must be a whole number"),
    ("2;3;4,4\n", "2;3;4,4,extra\n", "line 3: 7 values but the header has 6 columns"),
])
def test_class_table_errors_name_file_line_and_field(tmp_path, old, new, message):
    path = tmp_path / "classes.csv"
    assert old in GOOD_CLASSES
    path.write_text(GOOD_CLASSES.replace(old, new, 1))
    with pytest.raises(spec.SpecError) as e:
        spec.load_classes(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_class_table_missing_and_empty(tmp_path):
    with pytest.raises(spec.SpecError, match="no such file"):
        spec.load_classes(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(spec.SpecError, match="empty file"):
        spec.load_classes(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(GOOD_CLASSES.splitlines()[0] + "\n")
    with pytest.raises(spec.SpecError, match="no classes"):
        spec.load_classes(tmp_path / "header.csv")


def test_sample_selection_round_trip(tmp_path):
    sel = spec.load_selection(SAMPLE_DIR / "selection.csv")
    assert len(sel.foregrounds) == 9 and len(sel.backgrounds) == 12
    assert len({b.category for b in sel.backgrounds}) == 12  # the issue: at least 10 of the 41 categories
    out = sel.save(tmp_path / "again.csv")
    assert out.read_bytes() == (SAMPLE_DIR / "selection.csv").read_bytes()


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("foreground,zebra", "fg,zebra"), "field 'kind' must be 'foreground' or 'background'"),
    (lambda t: t.replace("grass/green_meadow.jpg", "../grass.jpg"), "field 'file' must be a relative path inside"),
    (lambda t: t.replace("212826d645e3b0e6_m0898b_03d29d2c.png", "../x.png"), "field 'mask_path' must be a bare"),
    (lambda t: t.replace("bf1e062f3a2099ce", "zz"), "field 'sha256' is not a sha256 hex digest"),
    (lambda t: t + t.splitlines()[-1] + "\n", "uid 'wood_mossy_bark' repeats line"),
    (lambda t: "\n".join(r for r in t.splitlines() if not r.startswith("background")) + "\n", "no background rows"),
])
def test_selection_errors(tmp_path, edit, message):
    path = tmp_path / "selection.csv"
    path.write_text(edit((SAMPLE_DIR / "selection.csv").read_text()))
    with pytest.raises(spec.SpecError) as e:
        spec.load_selection(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_seeded_order_is_stable():
    keys = [f"k{i}" for i in range(50)]
    a = spec.seeded_order(keys, 0)
    assert a == spec.seeded_order(list(reversed(keys)), 0)  # input order does not matter
    assert a != spec.seeded_order(keys, 1)  # the seed does
    sub = spec.seeded_order(keys[:25], 0)  # removing candidates keeps the others' relative order
    assert sub == [k for k in a if k in set(keys[:25])]


def test_background_file_table_errors(tmp_path):
    path = tmp_path / "backgrounds.csv"
    path.write_text("category,file,uid\ngrass,grass/a.png,g1\ngrass,grass/b.png,g1\n")
    with pytest.raises(spec.SpecError, match=r"line 3: uid 'g1' repeats line 2"):
        spec.read_background_files(path)
    path.write_text("category,file,uid,width\ngrass,/etc/passwd,g1,\n")
    with pytest.raises(spec.SpecError, match=r"line 2: field 'file' must be a relative path"):
        spec.read_background_files(path)


# ----------------------------------------------------------------------------- encodings and quoting
def _classes_bytes() -> bytes:
    return (OOC_DATASET_DIR / "classes.csv").read_bytes()


def test_a_byte_that_is_not_utf8_is_named_with_file_and_line(tmp_path, capsys):
    from bitlab.cli import main

    lines = _classes_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b",", b",Caf\xe9 ", 1)  # Latin-1, as an old spreadsheet saves it
    bad = tmp_path / "classes.csv"
    bad.write_bytes(b"".join(lines))
    with pytest.raises(BitlabError, match=rf"{bad} line 3: byte 0xe9 at column \d+ is not UTF-8 text"):
        spec.load_classes(bad)
    out = tmp_path / "oi"
    assert main(["openimages", "fetch", "--classes", str(bad), "--out", str(out),
                 "--base-url", "http://127.0.0.1:9", "--images-url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {bad} line 3: byte 0xe9" in err and not out.exists()
    table = tmp_path / "backgrounds.csv"
    table.write_bytes(b"category,file,uid,author\ngrass,grass/a.png,g1,J\xf6rg\n")
    with pytest.raises(BitlabError, match=rf"{table} line 2: byte 0xf6 at column 23 is not UTF-8 text"):
        spec.read_background_files(table)
    categories = tmp_path / "categories.csv"
    categories.write_bytes(b"category,search_terms\ngrass,gr\xffass\n")
    with pytest.raises(BitlabError, match=rf"{categories} line 2: byte 0xff"):
        spec.load_background_categories(categories)


def test_a_bom_is_accepted_everywhere(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _classes_bytes())
    assert spec.load_classes(path) == spec.load_classes(OOC_DATASET_DIR / "classes.csv")
    sel = tmp_path / "selection.csv"
    sel.write_bytes(b"\xef\xbb\xbf" + (SAMPLE_DIR / "selection.csv").read_bytes())
    assert spec.load_selection(sel).rows() == spec.load_selection(SAMPLE_DIR / "selection.csv").rows()


def test_an_unterminated_quote_is_reported_as_such_with_its_line(tmp_path):
    lines = (SAMPLE_DIR / "selection.csv").read_text().splitlines(keepends=True)
    kind, group, rest = lines[2].split(",", 2)
    lines[2] = f'{kind},{group},"{rest}'  # the quote opened before uid never closes
    path = tmp_path / "selection.csv"
    path.write_text("".join(lines))
    with pytest.raises(spec.SpecError, match=rf"{path} line 3: a quoted field opens on this line and is never "
                                             r"closed \(an unmatched \"\)"):
        spec.load_selection(path)
    lines[2] = f'{kind},{group},"{rest.replace(",", "", 1)}'  # closed by a stray quote further down
    lines[4] = lines[4].replace(",", '",', 1)
    path.write_text("".join(lines))
    with pytest.raises(spec.SpecError, match=rf"{path} line 3: "):
        spec.load_selection(path)
