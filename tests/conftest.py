"""Shared fixtures: one tiny random model (with audio) per test session, built offline, and one saved."""

from pathlib import Path

import numpy as np
import pytest
import torch

from phi3mm.build import build_tiny_model, save_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, processor) in eval mode, fp32, with the real Phi-3.5 tokenizer (the embedding has its
    32,064 rows): masks, templates and placeholders are tested against what real runs tokenize.
    Shared, so tests must not train it."""
    from phi3mm.real_parts import phi35_tokenizer_path

    model, processor = build_tiny_model(tmp_path_factory.mktemp("tiny_components"), tokenizer=phi35_tokenizer_path())
    return model.eval(), processor


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A saved tiny composite checkpoint (the toy tokenizer): what --model_name_or_path points at after
    stage 1, and what ZeRO-3 needs (no process may assemble a base alone). Read-only for tests."""
    work = tmp_path_factory.mktemp("base")
    model, processor = build_tiny_model(work / "components")
    return save_checkpoint(model, processor, work / "base")


def shape_image(color=(255, 0, 0), left=True, size=64) -> np.ndarray:
    image = np.full((size, size, 3), 255, np.uint8)
    x0 = 4 if left else size // 2 + 4
    image[20:40, x0 : x0 + 20] = color
    return image


def tone(freq=300.0, seconds=1.0, rate=16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP's waiting
    threads made training tests 5x slower (same losses either way). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    torch.manual_seed(0)
    return np.random.default_rng(0)
