import os

import pytest
import torch

# Offline always: tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# fp32 training by default, also on CPUs with native bf16 (where model.autocast = "auto" picks bf16):
# the exact-resume, accumulation, torchrun and parity tests compare fp32 numbers. Set here, at import,
# so the CLI and torchrun subprocesses inherit it; tests of bf16 itself set model.autocast or this
# variable explicitly (tests/test_train_bf16.py).
os.environ.setdefault("GEMMALAB_CPU_BF16", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model_path():
    """The embedded Gemma 3 270M GGUF (assembled from the PyPI chunk packages on first use)."""
    from gemmalab._paths import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def lm(model_path):
    """Our fp32 load of the real 270M, shared by the tests that need it."""
    import gemmalab
    return gemmalab.load(model_path, mode="fp32")


@pytest.fixture
def one_thread():
    """Tiny models on one thread: two threads on two cores that other jobs share make every small op
    wait for a descheduled OpenMP worker (measured 2.5x slower). Use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
