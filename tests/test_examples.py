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


def test_char_lm(tmp_path, capsys):
    for module in ("matplotlib", "tqdm"):
        pytest.importorskip(module)
    lm = load("char_lm")
    history = lm.main(["--steps", "4", "--batch-size", "4", "--hidden", "16", "--files", "2",
                       "--bptt", "8", "--valid-lines", "40", "--plot", str(tmp_path / "lm.png")])
    assert (tmp_path / "lm.png").stat().st_size > 0
    assert all(math.isfinite(v) and 0 < v < math.log(256) * 1.2 for v in history["valid"])
    # It says what it computes: the validation loss is over the lines it names, all of them.
    out = capsys.readouterr().out
    held_out = len(lm.load_lines(100, 2, 0)) // 10
    assert f"validation on 40 of the {max(held_out, 4)} held-out lines" in out


def test_char_lm_validation_covers_every_named_line():
    pytest.importorskip("tqdm")
    import torch
    lm = load("char_lm")
    torch.manual_seed(0)
    model = lm.CharLM(8, 1)
    lines = lm.load_lines(100, 1, 0)[:10]
    batches = [lm.make_batch(lines[i:i + 4]) for i in range(0, 10, 4)]  # 4 + 4 + 2 lines
    whole = lm.run_batch(model.eval(), lm.make_batch(lines), 8)
    assert abs(lm.evaluate(model, batches, 8) - whole) < 1e-5


def test_example_plots_go_to_docs_by_default():
    pytest.importorskip("tqdm")
    for name in ("char_lm", "japanese_vowels"):
        module = load(name)
        assert module.DOCS == EXAMPLES.parent / "docs"
        assert (module.DOCS / f"{name}.png").exists()  # the committed plot the README shows
