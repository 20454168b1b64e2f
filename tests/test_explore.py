"""The robustness explorer, used as a person would in a real ipykernel: dropdowns pick the model
pair, the class x background cell and one image; the top-5 figure under it is redrawn each time."""
from __future__ import annotations

import json

import nbformat
import pytest
import torch

from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.models import zoo
from tests.fixtures.figures import assert_real_figure
from tests.fixtures.ooc_sets import build_tiny_ooc
from tests.notebooks.test_notebooks import _kernel_env

KERNEL = r'''
import json
from bitlab.eval.results import load_results
from bitlab.explore import Explorer

ex = Explorer({"real": load_results(REAL), "random": load_results(RANDOM)}, max_images=2, save_as=(FIGS, "fig12_left"))


def state():
    return {"images": ex.cell_images(), "shown": ex.shown(), "summary": ex.summary.value,
            "figure": [sorted(o["data"]) for o in ex.figure.outputs], "title": ex.figure.outputs and
            ex.figure.outputs[0]["data"]["text/plain"], "save enabled": not ex.save.disabled}


steps = {"start": state(), "models": [ex.model_a.value, ex.model_b.value],
         "classes": list(ex.cls.options), "backgrounds": list(ex.background.options)}
ex.cls.value = "cat"
steps["cat"] = state()
ex.background.value = "in-context"
steps["cell"] = state()
ex.background.value = "(any)"
ex.image.value = steps["cat"]["images"][-1]
steps["one image"] = state()
ex.save.click()
steps["saved"] = sorted(p.name for p in ex.saved)
ex.model_a.value, ex.model_b.value = "random", "real"
steps["swapped"] = state()
print(json.dumps(steps))
'''


@pytest.fixture(scope="module")
def ooc_results(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("explore")
    ooc = build_tiny_ooc(root / "ooc", photos)
    torch.manual_seed(0)
    for key, model, extra in (("real", zoo.OFFLINE_IMAGENET_MODEL, {}), ("random", "R14x0.5", {"image_size": 64, "random_init": True})):
        evaluate(EvaluateConfig(model=model, data=str(ooc), out=str(root / key), progress=False, **extra))
    return root


def test_explorer_dropdowns_pick_pair_cell_and_image_in_a_real_kernel(ooc_results, tmp_path):
    import nbclient

    code = (f"REAL, RANDOM = {str(ooc_results / 'real')!r}, {str(ooc_results / 'random')!r}\n"
            f"FIGS = {str(tmp_path / 'figs')!r}\n" + KERNEL)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("%matplotlib inline\n" + code)])
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with _kernel_env():
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=300).execute()
    out = nb.cells[0].outputs
    assert not [o for o in out if o.output_type == "error"], out
    steps = json.loads(next(o.text for o in out if o.output_type == "stream" and o.text.startswith("{")))
    figure = [["image/png", "text/plain"]]
    assert steps["models"] == ["real", "random"] and steps["classes"][0] == "(any)"
    assert set(steps["backgrounds"]) >= {"(any)", "in-context"}
    start = steps["start"]
    assert len(start["images"]) == 12 and len(start["shown"]) == 2 and start["figure"] == figure
    cat = steps["cat"]  # the cat's 4 images (in context and on 3 textures), 2 drawn
    assert len(cat["images"]) == 4 and all(i.startswith("cat/") for i in cat["images"])
    assert cat["shown"] == cat["images"][:2] and cat["figure"] == figure and cat["summary"].startswith("4 image(s)")
    # One cell: the cat in its own scene.
    cell = steps["cell"]
    assert cell["images"] == ["cat/chelsea__in-context.png"] and cell["shown"] == cell["images"]
    assert steps["one image"]["shown"] == [cat["images"][-1]] and steps["one image"]["figure"] == figure
    assert not cat["save enabled"] and steps["one image"]["save enabled"]  # one image: Fig. 12 left
    assert steps["saved"] == ["fig12_left.pdf", "fig12_left.png"]
    assert_real_figure(tmp_path / "figs" / "fig12_left.png")
    assert steps["swapped"]["shown"] == steps["swapped"]["images"][:2]  # a new pair shows its cell again
    assert steps["swapped"]["figure"] == figure
