from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small real triplet dataset (images, espeak-ng speech, captions) in tar shards."""
    from omni_core.data.synth import generate

    out = tmp_path_factory.mktemp("triplets")
    generate(out, n_train=24, n_eval=8, seed=0, workers=2, shard_size=12)
    return out
