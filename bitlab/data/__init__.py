"""Data: OpenCV pre-processing, datasets, ILSVRC-2012 class names."""
