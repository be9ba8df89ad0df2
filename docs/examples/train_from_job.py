"""Train CGN's invariant classifier on a counterfactual dataset job, end to end with the client.

    python docs/examples/train_from_job.py                         # 10,000 samples, 2 epochs, against $SKDCGN_URL
    python docs/examples/train_from_job.py --n 200 --epochs 1      # a quick look
    python docs/examples/train_from_job.py --format webdataset --real-test   # tar shards; score on real digits

It asks the service for a dataset job (shape labels drawn uniformly, `--per-shape` counterfactuals sharing each
mask, as in CGN), waits for it with a progress bar, downloads and verifies its files (an interrupted run resumes
the download), then trains the SmallCNN of experiments/classifier.py with CGN's recipe (Adadelta, StepLR)
through client.torch_data and a DataLoader. It reports the accuracy on held-out counterfactuals and, with
--real-test, on real MNIST digits wearing random colours (the invariance test: ~10 % means the classifier learnt
colour, not shape). Needs torch (the training extra); the service needs nothing but a running `skdcgn serve`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="the service (default $SKDCGN_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="X-API-Key (default $SKDCGN_API_KEY)")
    parser.add_argument("--n", type=int, default=10_000, help="samples in the job (default 10,000)")
    parser.add_argument("--format", choices=["npz", "webdataset"], default="npz")
    parser.add_argument("--per-shape", type=int, default=10, help="counterfactuals per mask (CGN: 10)")
    parser.add_argument("--seed", type=int, default=0, help="the job's seed and the training seed")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out counterfactuals (default 0.1)")
    parser.add_argument("--dir", default="runs/example_jobs", help="downloads go to DIR/<job id>/")
    parser.add_argument("--real-test", action="store_true",
                        help="also score on real t10k digits with random colours (needs MNIST; SKDCGN_MNIST_DIR)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, random_split

    from client import Client
    from client.torch_data import NpzCounterfactuals, ShardCounterfactuals, to_tensor
    from experiments.classifier import SmallCNN, TrainConfig

    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    with Client(args.url, args.api_key) as client:
        job = client.create_job(args.n, format=args.format, seed=args.seed,
                                counterfactuals_per_shape=args.per_shape)
        print(f"job {job.id}: {args.n} samples ({args.format}) from {job.model}/{job.version}", flush=True)
        job = client.wait(job, progress=progress)
        files = client.download(job, Path(args.dir) / job.id, progress=progress)

    def transform(image):  # uint8 HWC → float [-1, 1] CHW, the range of the real test digits
        return to_tensor(image) * 2 - 1

    if args.format == "npz":
        dataset = NpzCounterfactuals(files[0], transform=transform)
    else:
        dataset = ShardCounterfactuals([f.path for f in files if f.name.endswith(".tar")], transform=transform)
    held_out = max(1, int(len(dataset) * args.val_fraction))
    generator = torch.Generator().manual_seed(args.seed)
    train_set, val_set = random_split(dataset, [len(dataset) - held_out, held_out], generator=generator)

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)
    torch.manual_seed(args.seed)
    model = SmallCNN(in_channels=3)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.gamma)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator)
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        total, seen = 0.0, 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        scheduler.step()
        print(f"epoch {epoch + 1}/{config.epochs}: loss {total / max(seen, 1):.4f}", flush=True)

    def accuracy(batches) -> float:
        model.eval()
        right = count = 0
        with torch.no_grad():
            for x, y in batches:
                right += int((model(x).argmax(1) == y).sum())
                count += len(y)
        return 100.0 * right / max(count, 1)

    summary = {"job": job.id, "model": f"{job.model}/{job.version}", "samples": len(dataset),
               "epochs": config.epochs, "seconds": round(time.perf_counter() - started, 1),
               "heldout_counterfactual_accuracy": accuracy(DataLoader(val_set, batch_size=256))}
    if args.real_test:
        import numpy as np

        from experiments.invariance import real_splits

        _, test = real_splits(job.model)
        pairs = [(torch.from_numpy(np.ascontiguousarray(test.images[i:i + 256])),
                  torch.from_numpy(test.labels[i:i + 256])) for i in range(0, len(test.labels), 256)]
        summary["real_random_colour_accuracy"] = accuracy(pairs)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
