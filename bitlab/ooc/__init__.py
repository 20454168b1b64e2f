"""The out-of-context (OOC) dataset of BiT's robustness study (paper appendix F), made reproducible.

Data flows one way: `openimages` (OpenImages tree: read + fetch) and `backgrounds` (Openverse or
user folders) -> `select` (`make-ooc plan`: selection.csv) -> `compose` (geometry and blending of
one image) -> `build` (`make-ooc`: all images, manifest, attribution). `spec` reads and writes the
specification files (classes.csv, background tables, selection.csv).
"""
