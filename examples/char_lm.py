"""Character-level language model over variable-length lines of real text.

The text is the source of Python's standard library (already on the machine).
Each line is a sequence of bytes; a batch is a padded set of lines with their
lengths. Embedding -> MaskedLSTM -> MaskedLinearCrossEntropy (the output layer
fused with its loss; padding never counts) predicts the next byte, trained with
truncated BPTT: each batch is cut into windows of --bptt steps and the LSTM
state is carried across windows, detached.

    python examples/char_lm.py                  # loss/perplexity printed, plot in docs/char_lm.png
    python examples/char_lm.py --steps 50 --plot lm.png   # a quick look, plot elsewhere

A tenth of the lines is held out; the validation loss and perplexity are
computed on the first --valid-lines of them (all held-out lines with 0), per
predicted byte.
"""
import argparse
import glob
import math
import os
import pathlib
import random
import sysconfig
import time

import torch
from torch import nn
from tqdm import tqdm

from varlen_kernels import MaskedLinearCrossEntropy, MaskedLSTM, detach_state, tbptt_chunks

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def load_lines(max_len, limit_files=None, seed=0):
    """Non-empty lines of the standard library's .py files, as byte tensors."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    random.Random(seed).shuffle(files)
    lines = []
    for path in files[:limit_files]:
        with open(path, "rb") as f:
            for line in f.read().splitlines():
                line = line.rstrip()
                if 2 <= len(line) <= max_len:
                    lines.append(torch.tensor(list(line), dtype=torch.long))
    return lines


def make_batch(lines):
    """Padded (B, T) bytes with lengths; inputs are line[:-1], targets line[1:]."""
    lengths = torch.tensor([len(x) - 1 for x in lines])
    T = int(lengths.max())
    inputs = torch.zeros(len(lines), T, dtype=torch.long)
    targets = torch.full((len(lines), T), -1, dtype=torch.long)  # padding: never read
    for i, x in enumerate(lines):
        inputs[i, : len(x) - 1] = x[:-1]
        targets[i, : len(x) - 1] = x[1:]
    return inputs, targets, lengths


class CharLM(nn.Module):
    def __init__(self, hidden, layers):
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.rnn = MaskedLSTM(64, hidden, num_layers=layers, batch_first=True)
        # The output layer fused with its loss: never holds the logits of every byte.
        self.head = MaskedLinearCrossEntropy(hidden, 256)

    def forward(self, x, lengths, state=None):
        """Hidden states (B, T, hidden) and the recurrent state."""
        return self.rnn(self.embed(x), lengths, state)


def run_batch(model, batch, bptt, opt=None):
    """Mean loss per predicted byte over one batch, trained window by window."""
    inputs, targets, lengths = batch
    state, total = None, 0.0
    for chunk in tbptt_chunks(inputs, lengths, bptt, batch_first=True):
        hidden, state = model(chunk.input, chunk.lengths, state)
        window_targets = targets[:, chunk.start:chunk.start + hidden.shape[1]]
        loss_sum = model.head(hidden, window_targets, chunk.lengths, reduction="sum",
                              batch_first=True)
        if opt is not None:
            opt.zero_grad()
            (loss_sum / chunk.lengths.sum().clamp_min(1)).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        total += loss_sum.item()
        state = detach_state(state)
    return total / max(int(lengths.sum()), 1)


def evaluate(model, batches, bptt):
    """Mean loss per predicted byte over every validation batch."""
    model.eval()
    total = tokens = 0
    with torch.no_grad():
        for batch in batches:
            n = int(batch[2].sum())
            total += run_batch(model, batch, bptt) * n
            tokens += n
    return total / max(tokens, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--bptt", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--files", type=int, default=60, help="standard library files to read")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid-lines", type=int, default=128,
                    help="held-out lines to compute the validation loss on (0: all of them)")
    ap.add_argument("--plot", default=str(DOCS / "char_lm.png"), help="where to write the plot ('' for none)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    lines = load_lines(args.max_len, args.files, args.seed)
    split = max(len(lines) // 10, args.batch_size)
    held_out, train_lines = lines[:split], lines[split:]
    valid_lines = held_out[:args.valid_lines] if args.valid_lines > 0 else held_out
    valid_bytes = sum(len(x) - 1 for x in valid_lines)
    print(f"{len(train_lines)} training lines; validation on {len(valid_lines)} of the "
          f"{len(held_out)} held-out lines ({valid_bytes} predicted bytes)")
    model = CharLM(args.hidden, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed)
    size = 4 * args.batch_size
    valid_batches = [make_batch(valid_lines[i:i + size]) for i in range(0, len(valid_lines), size)]
    history = {"step": [], "train": [], "valid": []}
    start = time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc="training", unit="batch"):
        model.train()
        train_loss = run_batch(model, make_batch(rng.sample(train_lines, args.batch_size)), args.bptt, opt)
        if step % max(args.steps // 10, 1) == 0 or step == args.steps:
            valid_loss = evaluate(model, valid_batches, args.bptt)
            history["step"].append(step)
            history["train"].append(train_loss)
            history["valid"].append(valid_loss)
            tqdm.write(f"step {step:5d}  train loss {train_loss:.3f}  valid loss {valid_loss:.3f}  "
                       f"valid perplexity {math.exp(valid_loss):.2f}")
    print(f"trained in {time.perf_counter() - start:.1f} s; final valid perplexity "
          f"{math.exp(history['valid'][-1]):.2f} on {len(valid_lines)} held-out lines "
          f"(uniform over bytes: 256)")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(history["step"], history["train"], label="train")
        a.plot(history["step"], history["valid"], label="valid")
        a.set(xlabel="step", ylabel="loss (nats per byte)")
        a.legend()
        b.plot(history["step"], [math.exp(v) for v in history["valid"]])
        b.set(xlabel="step", ylabel="valid perplexity", yscale="log")
        fig.tight_layout()
        pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return history


if __name__ == "__main__":
    main()
