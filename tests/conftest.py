import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

DATASETS = Path(__file__).resolve().parents[1] / "datasets"  # real data carried in the repository


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The repository's ``datasets/`` folder (the Dubai set and the authors' label-embedding weights)."""
    if not (DATASETS / "dubai_aerial" / "images").is_dir():
        pytest.skip(f"{DATASETS} is not present (a clone of the repository carries it)")
    return DATASETS

@pytest.fixture
def one_thread():
    """Run a test on one torch thread (the CI box has 2 cores, shared with other processes), then restore."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# CI runs the property tests with a fixed seed, so a submission's result does not depend on the draw.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")
