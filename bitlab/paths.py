"""Where the source tree keeps bitlab's data files (class tables, the embedded offline sample)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OOC_DATASET_DIR = REPO_ROOT / "ooc_dataset"
SAMPLE_DIR = OOC_DATASET_DIR / "sample"
FIGURES_DIR = REPO_ROOT / "figures"
