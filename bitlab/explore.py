"""The robustness explorer: ipywidgets over `bitlab evaluate` results, in JupyterLab.

Choose two models, a class and a background (dropdowns; "any" for all), and an image of that cell
(or all of them): the images are drawn beside both models' top-5 bars (`report.fig_top5`, the
figure of paper Fig. 12 left / 13), so the cell behind a number of the heat map, and the Fig. 12 left
image (saved with a button), are picked by clicking instead of by typing paths.

    explorer = Explorer({r.label: r for r in ooc_results})
    explorer  # display it in JupyterLab
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping

from bitlab import report
from bitlab.errors import BitlabError
from bitlab.eval.results import Results

ANY = "(any)"


class Explorer:
    """Model pair, class, background and image dropdowns over out-of-context `results` (label ->
    Results, the same images in each); at most `max_images` images of a cell are drawn at once.
    `save_as` (folder, stem): a button saves the figure of the one image chosen there (PNG and
    PDF, `report.save`), e.g. as Fig. 12 left."""

    def __init__(self, results: Mapping[str, Results], fits: Collection[str] = (), max_images: int = 4,
                 save_as: tuple[str | Path, str] | None = None) -> None:
        import ipywidgets as w  # the notebooks extra

        if not results:
            raise BitlabError("the explorer needs at least one model's results")
        self.results, self.fits, self.max_images = dict(results), set(fits), max_images
        labels = list(self.results)
        first = self.results[labels[0]].predictions
        self.model_a = w.Dropdown(options=labels, value=labels[0], description="left")
        self.model_b = w.Dropdown(options=labels, value=labels[min(1, len(labels) - 1)], description="right")
        self.cls = w.Dropdown(options=[ANY, *sorted(first["class"].unique())], description="class")
        backgrounds = sorted(b for b in first["background"].unique() if b)
        self.background = w.Dropdown(options=[ANY, *backgrounds], description="background",
                                     disabled=not backgrounds)
        self.image = w.Dropdown(description="image", layout=w.Layout(width="46em"))
        self.summary = w.HTML()
        self.figure = w.Output()
        self.save_as, self.saved = save_as, []
        self.save = w.Button(description=f"save as {save_as[1]}" if save_as else "save", disabled=True,
                             layout=w.Layout(width="auto", display="" if save_as else "none"))
        self.save.on_click(lambda _: self._save())
        for box in (self.model_a, self.model_b, self.cls, self.background):
            box.observe(lambda _: self._cell_changed(), names="value")
        self._updating = False  # while the image list is replaced: one redraw at its end, not one per change
        self.image.observe(lambda _: self._updating or self.draw(), names="value")
        self.widget = w.VBox([w.HBox([self.model_a, self.model_b]), w.HBox([self.cls, self.background]),
                              w.HBox([self.image, self.save]), self.summary, self.figure])
        self._cell_changed()

    def _repr_mimebundle_(self, **kwargs) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = (f"[robustness explorer over {len(self.results)} model(s): run this cell in JupyterLab "
                              "with a kernel to use it]")
        return bundle

    def cell_images(self) -> list[str]:
        """The images of the chosen class x background cell that both models scored (a head over a
        subset of the classes scores only its classes'): those where the left model is wrong and the
        right one right first (the paper's rule), then the rest, each group in file order."""
        df = self.results[self.model_a.value].predictions
        both = df["image"].isin(self.results[self.model_b.value].predictions["image"])
        keep = df[both & ((df["class"] == self.cls.value) | (self.cls.value == ANY))
                  & ((df["background"] == self.background.value) | (self.background.value == ANY))]
        telling = set(report.telling_images(self.results[self.model_a.value], self.results[self.model_b.value]))
        return sorted(keep["image"], key=lambda i: (i not in telling, i))

    def _cell_changed(self) -> None:
        images = self.cell_images()
        a, b = self.model_a.value, self.model_b.value
        rows = [self.results[m].predictions.set_index("image").loc[images, "top1_correct"] for m in (a, b)]
        self.summary.value = (f"{len(images)} image(s); top-1 right: {a} {int(rows[0].sum())}, {b} {int(rows[1].sum())}"
                              if images else "no images in this cell")
        first = f"all {len(images)}" + (f" (the first {self.max_images} drawn)" if len(images) > self.max_images else "")
        options = [(first, "")] + [(i, i) for i in images]
        self._updating = True
        try:
            self.image.options = options if images else [("none", "")]
            self.image.value = ""
        finally:
            self._updating = False
        self.draw()

    def shown(self) -> list[str]:
        """The images drawn now: the chosen one, or the cell's first `max_images`."""
        return [self.image.value] if self.image.value else self.cell_images()[:self.max_images]

    def _figure(self, images: list[str]):
        a, b = self.results[self.model_a.value], self.results[self.model_b.value]
        return report.fig_top5(a, b, images, self.fits)

    def draw(self) -> None:
        """Redraws the figure (kept in the widget's state, so a test or a saved notebook can see it)."""
        self.figure.outputs = ()
        self.save.disabled = not self.image.value
        if images := self.shown():
            self.figure.append_display_data(self._figure(images))

    def _save(self) -> None:
        if self.save_as and self.image.value:
            self.saved = report.save(self._figure([self.image.value]), *self.save_as)
            self.summary.value += f"<br>saved {', '.join(p.name for p in self.saved)} in {self.save_as[0]}"
