"""Error analysis: mistakes with their words, Fig. 7's groups, confusion pairs, the ratings CSV and
the ipywidgets rating form (clicked here as a person would)."""
from __future__ import annotations

import numpy as np
import pytest

from bitlab.data import imagenet
from bitlab.errors import BitlabError
from bitlab.eval import errors
from bitlab.eval.robustness import EvalItem, predictions_table

CAT, MISSILE = (281, 282, 285), (657, 744)


@pytest.fixture
def predictions():
    """Five images scored by the real scoring code: two right, three wrong (one top-5 right)."""
    solar, hammer = imagenet.names().index("solar dish"), imagenet.names().index("hammer")
    items = [EvalItem("cat/a.png", "cat", CAT, "grass"), EvalItem("rocket/b.png", "rocket", MISSILE, "grass"),
             EvalItem("rocket/c.png", "rocket", MISSILE, "brick"), EvalItem("rocket/d.png", "rocket", MISSILE, "sky"),
             EvalItem("n01440764/e.png", "n01440764", (0,), "")]
    top = np.array([[281, 1, 2, 3, 4], [solar, 657, 1, 2, 3], [hammer, 1, 2, 3, 4], [solar, 1, 2, 3, 4],
                    [1, 2, 3, 4, 5]])
    probs = np.tile(np.array([0.5, 0.2, 0.1, 0.1, 0.1], np.float32), (5, 1))
    return predictions_table(items, top, probs, np.full(5, 0.1, np.float32))


def test_mistakes_have_prediction_and_label_words(predictions):
    m = errors.mistakes(predictions)
    assert m["image"].tolist() == ["rocket/b.png", "rocket/c.png", "rocket/d.png", "n01440764/e.png"]
    assert m["prediction"].tolist() == ["solar dish", "hammer", "solar dish", imagenet.names()[1]]
    # A class folder keeps its name; an ILSVRC wnid folder becomes its ILSVRC name.
    assert m["label"].tolist() == ["rocket"] * 3 + [imagenet.names()[0]]
    assert m["accepted"].iloc[0] == "missile, projectile"
    assert m["topk_correct"].tolist() == [True, False, False, False]


def test_groups_by_topk_and_by_confusion(predictions):
    m = errors.mistakes(predictions)
    groups = errors.by_topk(m)
    assert list(groups) == ["top-1 wrong, top-5 right", "top-5 wrong too"]
    assert groups["top-1 wrong, top-5 right"]["image"].tolist() == ["rocket/b.png"]
    pairs = errors.confusion_pairs(m)
    assert pairs.iloc[0].to_dict() == {"label": "rocket", "prediction": "solar dish", "count": 2}
    assert pairs["count"].tolist() == [2, 1, 1]
    conf = errors.by_confusion(m, top=2)
    assert list(conf) == ["rocket → solar dish", pairs.iloc[1]["label"] + " → " + pairs.iloc[1]["prediction"]]
    assert conf["rocket → solar dish"]["image"].tolist() == ["rocket/b.png", "rocket/d.png"]
    assert list(errors.by_confusion(m, min_count=2)) == ["rocket → solar dish"]
    assert errors.by_topk(m.iloc[:0]) == {}
    # Fig. 7 right's top group: the raters' consensus sides with the prediction; it leaves the others.
    groups = errors.by_topk(m, {"rocket/d.png": "prediction", "rocket/c.png": "label", "rocket/b.png": "unsure"})
    assert list(groups) == ["prediction more representative than the label (raters)", "top-1 wrong, top-5 right",
                            "top-5 wrong too"]
    assert groups["prediction more representative than the label (raters)"]["image"].tolist() == ["rocket/d.png"]
    assert groups["top-5 wrong too"]["image"].tolist() == ["rocket/c.png", "n01440764/e.png"]


def test_agreement_is_cohens_and_fleiss_kappa_on_the_shared_mistakes(predictions):
    m = errors.mistakes(predictions).set_index("image", drop=False)
    r = errors.empty_ratings()
    for image, ana, bo in [("rocket/b.png", "prediction", "prediction"), ("rocket/c.png", "label", "label"),
                           ("rocket/d.png", "prediction", "neither"), ("n01440764/e.png", "label", "prediction")]:
        r = errors.record(r, m.loc[image], "ana", ana)
        r = errors.record(r, m.loc[image], "bo", bo)
    assert errors.agreement(r.iloc[::2], m) is None  # one rater: nothing to agree on
    stats = errors.agreement(r, m)
    # By hand: observed agreement 2/4; ana's marginals (1/2 prediction, 1/2 label), bo's (1/2, 1/4, 1/4):
    # chance 1/2*1/2 + 1/2*1/4 = 3/8, Cohen's kappa (1/2 - 3/8) / (5/8) = 0.2. Fleiss' pools the raters'
    # marginals (4/8, 3/8, 1/8): chance 26/64, kappa (1/2 - 26/64) / (38/64) = 6/38.
    assert stats["images"] == 4 and stats["raters"] == ["ana", "bo"]
    assert stats["cohen_kappa"] == pytest.approx(0.2) and stats["fleiss_kappa"] == pytest.approx(6 / 38)
    r3 = errors.record(r, m.loc["rocket/b.png"], "cy", "prediction")  # a third rater on one image only
    three = errors.agreement(r3, m)
    assert three["images"] == 1 and "cohen_kappa" not in three and three["fleiss_kappa"] is None  # 0 / 0
    assert "all 3 raters chose 'prediction'" in errors.agreement_text(three)
    r3 = errors.record(r3, m.loc["rocket/c.png"], "cy", "neither")
    three = errors.agreement(r3, m)
    # Two images: b all 'prediction', c (label, label, neither); pooled (3/6, 2/6, 1/6): chance 14/36;
    # per image agreement 1 and 1/3: kappa (2/3 - 14/36) / (22/36) = 10/22.
    assert three["fleiss_kappa"] == pytest.approx(10 / 22)
    assert "Fleiss' κ = 0.45" in errors.agreement_text(three) and "Cohen" not in errors.agreement_text(three)


def test_ratings_round_trip_replace_and_consensus(predictions, tmp_path):
    m = errors.mistakes(predictions).set_index("image", drop=False)
    path = tmp_path / "ratings.csv"
    assert errors.read_ratings(path).empty  # no file yet: no ratings
    r = errors.empty_ratings()
    r = errors.record(r, m.loc["rocket/b.png"], "ana", "label")
    r = errors.record(r, m.loc["rocket/b.png"], "ana", "prediction")  # changed her mind: replaces
    r = errors.record(r, m.loc["rocket/b.png"], "bo", "prediction")
    r = errors.record(r, m.loc["rocket/c.png"], "ana", "label")
    r = errors.record(r, m.loc["rocket/c.png"], "bo", "prediction")  # split vote
    r = errors.record(r, m.loc["rocket/d.png"], "ana", "neither")
    errors.write_ratings(path, r)
    back = errors.read_ratings(path)
    assert len(back) == 5 and set(back.columns) == set(errors.RATING_COLUMNS)
    assert back.loc[back["image"] == "rocket/b.png", "prediction"].tolist() == ["solar dish"] * 2
    assert errors.consensus(back, m) == {"rocket/b.png": "prediction", "rocket/c.png": errors.UNSURE,
                                         "rocket/d.png": errors.UNSURE}
    three = errors.record(back, m.loc["rocket/c.png"], "cy", "label")  # 2 of 3 now side with the label
    assert errors.consensus(three, m)["rocket/c.png"] == "label"
    with pytest.raises(BitlabError, match="verdict 'maybe'"):
        errors.record(r, m.loc["rocket/b.png"], "ana", "maybe")


def test_ratings_of_another_prediction_are_ignored(predictions, tmp_path):
    """A verdict judged one prediction: when the image is predicted otherwise now (another model, or
    a re-evaluation sharing the ratings file), it neither colours the figure nor counts as rated."""
    m = errors.mistakes(predictions).set_index("image", drop=False)
    r = errors.record(errors.empty_ratings(), m.loc["rocket/b.png"], "ana", "prediction")
    other = predictions.assign(top1_name=predictions["top1_name"].replace("solar dish", "radio telescope"))
    now = errors.mistakes(other).set_index("image", drop=False)
    assert errors.consensus(r, m) == {"rocket/b.png": "prediction"}
    assert errors.consensus(r, now) == {}
    current, stale = errors.current_ratings(r, now)
    assert current.empty and stale["image"].tolist() == ["rocket/b.png"]
    # Rated again for the new prediction: both verdicts are kept, each for its own prediction.
    both = errors.record(r, now.loc["rocket/b.png"], "ana", "label")
    errors.write_ratings(tmp_path / "r.csv", both)
    back = errors.read_ratings(tmp_path / "r.csv")
    assert sorted(back["prediction"]) == ["radio telescope", "solar dish"]
    assert errors.consensus(back, now) == {"rocket/b.png": "label"}
    assert errors.consensus(back, m) == {"rocket/b.png": "prediction"}


@pytest.mark.parametrize("text,message", [
    ("image,rater,prediction\nx,a,p\n", "missing column\\(s\\) verdict"),
    ("image,rater,verdict\nx,a,label\n", "missing column\\(s\\) prediction"),
    ("image,rater,verdict,prediction\nx,a,maybe,p\n", "line 2: verdict 'maybe'"),
    ("image,rater,verdict,prediction\nx,a,label,p\nx,a,prediction,p\n",
     "line 3: 'a' rated 'x' predicted as 'p' already on line 2"),
    ("image,rater,verdict,prediction\nx,,label,p\n", "line 2: empty image or rater"),
])
def test_bad_ratings_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "r.csv"
    path.write_text(text)
    with pytest.raises(BitlabError, match=message):
        errors.read_ratings(path)
    with pytest.raises(BitlabError, match="no such ratings file"):
        errors.read_ratings(tmp_path / "none.csv", missing_ok=False)


def test_rating_tool_saves_every_click_and_resumes(predictions, tmp_path, photos):
    import cv2

    for rel in predictions["image"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), photos["rocket"][..., ::-1])
    m = errors.mistakes(predictions)
    path = tmp_path / "ratings.csv"
    tool = errors.RatingTool(m, tmp_path, path, rater="ana")
    assert tool.index == 0 and tool.image.value[:4] == b"\x89PNG"
    assert "solar dish" in tool.caption.value and "rocket" in tool.caption.value
    tool.buttons["prediction"].click()
    tool.buttons["label"].click()
    assert errors.read_ratings(path)["verdict"].tolist() == ["prediction", "label"]  # saved at once
    assert tool.index == 2
    tool.back.click()
    tool.buttons["neither"].click()  # re-rates the second mistake
    ratings = errors.read_ratings(path).set_index("image")
    assert ratings.loc["rocket/c.png", "verdict"] == "neither" and len(ratings) == 2
    again = errors.RatingTool(m, tmp_path, path, rater="ana")  # a new session starts at the first unrated
    assert again.index == 2
    other = errors.RatingTool(m, tmp_path, path, rater="bo")  # another rater starts from the beginning
    assert other.index == 0
    # Another model's mistakes on the same images: ana's verdicts judged other predictions, so she is
    # asked again from the first one, and told how many earlier ratings are set aside.
    renamed = m.assign(prediction=m["prediction"] + " (other model)")
    moved_on = errors.RatingTool(renamed, tmp_path, path, rater="ana")
    assert moved_on.index == 0 and "earlier verdict" not in moved_on.caption.value
    assert "0 of 4 rated" in moved_on.status.value and "2 earlier rating(s) of other predictions ignored" in \
        moved_on.status.value
    empty = errors.RatingTool(m.iloc[:0], tmp_path, path, rater="ana")  # a model without mistakes: said so
    assert "No mistakes to rate" in empty.widget.children[0].value
    assert empty._repr_mimebundle_()["text/plain"] == "[rating form: no mistakes to rate]"
