"""The examples run end to end on tiny settings, so they never rot."""
import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_japanese_vowels(tmp_path):
    for module in ("aeon", "matplotlib", "tqdm"):
        pytest.importorskip(module)
    results = load("japanese_vowels").main(["--epochs", "2", "--hidden", "16", "--plot", str(tmp_path / "jv.png")])
    assert (tmp_path / "jv.png").stat().st_size > 0
    for accuracy, seconds in results.values():
        assert 1 / 9 < accuracy <= 1 and seconds > 0  # two epochs already beat chance


def test_char_lm(tmp_path):
    for module in ("matplotlib", "tqdm"):
        pytest.importorskip(module)
    history = load("char_lm").main(["--steps", "4", "--batch-size", "4", "--hidden", "16", "--files", "2",
                                    "--bptt", "8", "--plot", str(tmp_path / "lm.png")])
    assert (tmp_path / "lm.png").stat().st_size > 0
    assert all(math.isfinite(v) and 0 < v < math.log(256) * 1.2 for v in history["valid"])
