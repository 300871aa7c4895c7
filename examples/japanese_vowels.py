"""Speaker classification on the UEA JapaneseVowels data set with MaskedLSTM.

Nine speakers utter a vowel; each recording is a variable-length sequence (7 to
29 frames) of 12 LPC cepstrum coefficients. The data ships inside the `aeon`
package, so nothing is downloaded. A MaskedLSTM reads the padded batch with its
lengths and classifies each sequence from its last valid state; the same model
(same initial weights) is also trained with nn.LSTM + pack_padded_sequence for
comparison.

    python examples/japanese_vowels.py            # full run, plot in docs/japanese_vowels.png
    python examples/japanese_vowels.py --epochs 2 --plot jv.png   # a quick look, plot elsewhere
"""
import argparse
import pathlib
import time

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from tqdm import tqdm

from varlen_kernels import MaskedLSTM

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def load(split):
    from aeon.datasets import load_japanese_vowels
    X, y = load_japanese_vowels(split=split)
    lengths = torch.tensor([x.shape[1] for x in X])
    padded = torch.zeros(len(X), int(lengths.max()), X[0].shape[0])
    for i, x in enumerate(X):
        padded[i, : x.shape[1]] = torch.from_numpy(np.asarray(x, dtype=np.float32).T)
    labels = torch.tensor([int(v) - 1 for v in y])
    return padded, lengths, labels


class Classifier(nn.Module):
    """An LSTM over the sequence, then a linear layer on its last valid state."""

    def __init__(self, features, hidden, classes, packed_baseline=False):
        super().__init__()
        self.packed_baseline = packed_baseline
        lstm = nn.LSTM(features, hidden, batch_first=True)
        self.rnn = lstm if packed_baseline else MaskedLSTM.from_torch(lstm)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, lengths):
        if self.packed_baseline:
            _, (h, _) = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        else:
            _, (h, _) = self.rnn(x, lengths)
        return self.head(h[-1])


def train(model, data, epochs, batch_size, lr, name, seed):
    x, lengths, y = data["train"]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = {"loss": [], "accuracy": []}
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc=name, unit="epoch"):
        model.train()
        order = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx], lengths[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history["loss"].append(total / len(y))
        history["accuracy"].append(evaluate(model, data["test"]))
    return history, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, split):
    model.eval()
    x, lengths, y = split
    return (model(x, lengths).argmax(1) == y).float().mean().item()


def plot(histories, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in histories.items():
        a.plot(h["loss"], label=name)
        b.plot(h["accuracy"], label=name)
    a.set(xlabel="epoch", ylabel="training loss", yscale="log")
    b.set(xlabel="epoch", ylabel="test accuracy")
    a.legend()
    b.legend()
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=str(DOCS / "japanese_vowels.png"),
                    help="where to write the plot ('' for none)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    train_split, test_split = load("train"), load("test")
    mean = train_split[0][train_split[0].abs().sum(-1) > 0].mean(0)
    std = train_split[0][train_split[0].abs().sum(-1) > 0].std(0)
    # Normalize the valid frames only; padding stays whatever it is (never read).
    norm = lambda s: ((s[0] - mean) / std, s[1], s[2])  # noqa: E731
    data = {"train": norm(train_split), "test": norm(test_split)}
    results, histories = {}, {}
    for name, packed in (("MaskedLSTM", False), ("nn.LSTM + pack_padded_sequence", True)):
        torch.manual_seed(args.seed)  # same initial weights for both
        model = Classifier(12, args.hidden, 9, packed_baseline=packed)
        histories[name], seconds = train(model, data, args.epochs, args.batch_size, args.lr, name, args.seed)
        results[name] = (evaluate(model, data["test"]), seconds)
    for name, (acc, seconds) in results.items():
        print(f"{name:32s} test accuracy {acc:.4f}   training time {seconds:.1f} s")
    if args.plot:
        plot(histories, args.plot)
        print(f"wrote {args.plot}")
    return results


if __name__ == "__main__":
    main()
