import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")


# --------------------------------------------------------------------------- #
# Real data beyond the CIFAR-10 subset the package ships: ../shared/data beside the clone, or
# ESAM_HF_TEST_DATA=DIR. Tests that need it skip, saying what it is and how to make it.
# --------------------------------------------------------------------------- #
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TEST_DATA = Path(os.environ.get("ESAM_HF_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
_HOW_TO_GET = {
    "cifar10-jpeg": "the complete CIFAR-10 in the layout of uoft-cs/cifar10 (columns img, label; train and test "
                    "splits); make it once, with the Hub reachable: python -m esam_hf.data.make_subset uoft-cs/cifar10 "
                    "DIR/cifar10-jpeg --all",
    "imagenet-sample": "a few ImageNet validation photos in the layout of ILSVRC/imagenet-1k (columns image, label; a "
                       "validation split), e.g. 64 rows of it saved as DIR/imagenet-sample/data/"
                       "validation-00000-of-00001.parquet",
}


def real_data(name: str) -> Path:
    path = TEST_DATA / name
    if not path.is_dir():
        pytest.skip(f"needs {path}: {_HOW_TO_GET[name]}; ESAM_HF_TEST_DATA=DIR points the tests at another DIR")
    return path


@pytest.fixture(scope="session")
def cifar_dir():
    return real_data("cifar10-jpeg")


@pytest.fixture(scope="session")
def imagenet_dir():
    return real_data("imagenet-sample")
