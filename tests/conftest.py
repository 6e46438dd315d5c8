"""Shared fixtures: a generated ImageNet-layout folder, tiny-model overrides, tools/run_net.py's main()."""

import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers_e2e as h  # noqa: E402


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """root/{train,val}/{cat,dog,zebra}/*.png: 24 train images, 7 val images (an odd number, on purpose).
    Read-only: tests that need to add files build their own with `make_image_folder`."""
    return h.make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture
def make_image_folder(tmp_path):
    """Builds a fresh folder under tmp_path: make_image_folder(name="data", train_counts=..., val_counts=...)."""

    def make(name="data", **kwargs):
        return h.make_image_folder(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def tiny_opts():
    """tiny_opts(data_dir, output_dir, SOLVER__MAX_EPOCH=3, ...) -> ["KEY", "VALUE", ...] for a tiny CPU run."""
    return h.tiny_opts


@pytest.fixture(scope="session")
def run_net():
    """tools/run_net.py's main(argv) -> return code."""
    return h.load_run_net().main


@pytest.fixture(autouse=True)
def _keep_subnormal_floats(monkeypatch):
    """CPU jobs run in this process (run_net, benchmark) would flush subnormal floats to zero (FLUSH_DENORMAL) in
    every thread that exists then or starts later, for the rest of the session, and nothing can turn OpenMP's threads
    back. Here they only record that they asked (a supported mode); the tests keep computing as the goldens were
    recorded. tests/test_denormals.py checks the real mode, in fresh interpreters."""
    import torch

    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: True)


@pytest.fixture(autouse=True)
def _reset_vitadapt_logging():
    """vitadapt's setup_logging attaches handlers to the root logger (one on the then-current sys.stdout, which
    pytest swaps per test, one on OUTPUT_DIR/stdout.log); drop them after each test so that nothing is logged
    into a closed capture stream or a deleted temporary folder."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_vitadapt", False):
            root.removeHandler(handler)
            stream = getattr(handler, "stream", None)
            if str(getattr(stream, "name", "")).endswith("stdout.log"):  # the file handler's own file only
                try:
                    stream.close()
                except Exception:
                    pass
    try:
        import vitadapt.utils.logging as vlog

        vlog._json_log_path = None
    except ImportError:
        pass


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for the module (golden comparisons, as recorded)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
