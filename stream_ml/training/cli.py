"""`stream-ml train DATASET`: train, evaluate against baselines, register (and optionally promote)."""

from __future__ import annotations

import argparse

from stream_ml.config import Settings, add_arguments
from stream_ml.features import feature_set
from stream_ml.registry import STAGES, Registry
from stream_ml.training.options import TrainOptions


def register(commands: argparse._SubParsersAction) -> None:
    d = TrainOptions()
    cmd = commands.add_parser(
        "train",
        help="train the scoring model on a replayed dataset and register it",
        description="Train the fraud MLP on the labelled rows of DATASET (a folder written by "
        "`stream-ml replay`), validate on the latest --val-fraction of them by event time, compare "
        "with trivial baselines, and register the model with its metrics, data version and "
        "reference distributions in the registry (--registry).",
    )
    cmd.add_argument("dataset", metavar="DATASET", help="dataset folder (data.parquet + manifest.json)")
    cmd.add_argument("--epochs", type=int, default=d.epochs, help=f"most epochs (default {d.epochs})")
    cmd.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    cmd.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    cmd.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    cmd.add_argument(
        "--hidden", type=_hidden, default=d.hidden, help="two hidden layer sizes (default 128,64)"
    )
    cmd.add_argument("--seed", type=int, default=d.seed, help="same seed, same data: same model on CPU")
    cmd.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help=f"stop after this many epochs without a better validation PR AUC (default {d.patience})",
    )
    cmd.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"latest share of labelled rows, by event time, kept for validation (default {d.val_fraction})",
    )
    cmd.add_argument(
        "--top-k", type=int, default=d.top_k, help=f"reviews a day for precision at top k (default {d.top_k})"
    )
    cmd.add_argument(
        "--pos-weight", type=float, default=None, help="loss weight of a fraud (default sqrt(legit/fraud))"
    )
    cmd.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    cmd.add_argument(
        "--threads", type=int, default=d.threads, help=f"CPU threads for training (default {d.threads})"
    )
    cmd.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    cmd.add_argument("--no-register", action="store_true", help="train and report, but do not register")
    cmd.add_argument(
        "--promote",
        metavar="STAGE",
        choices=STAGES,
        default=None,
        help="after registering, point STAGE (production, challenger, shadow) at it",
    )
    add_arguments(cmd)
    cmd.set_defaults(run=_train)


def _hidden(text: str) -> tuple[int, int]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive sizes like 128,64, not {text!r}")
    return sizes  # type: ignore[return-value]


def _train(args: argparse.Namespace, settings: Settings) -> int:
    if args.promote and args.no_register:
        raise ValueError("--promote needs a registered model: drop --no-register")
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        hidden=args.hidden,
        seed=args.seed,
        patience=args.patience,
        val_fraction=args.val_fraction,
        top_k=args.top_k,
        pos_weight=args.pos_weight,
        device=args.device,
        threads=args.threads,
        progress=not args.quiet,
        log=None if args.quiet else lambda line: print(line, flush=True),
    )
    from stream_ml.training.train import train  # torch: only when training

    result = train(args.dataset, options)
    print()
    print(result.summary())
    print()
    if args.no_register:
        print("not registered (--no-register)")
        return 0
    root = settings.registry_path()
    version = result.register(root)
    print(f"registered model {version} in {root}")
    if args.promote:
        serving = feature_set(settings.feature_set).version
        Registry(root).promote(version, args.promote, serving_feature_set=serving)
        print(f"promoted {version} to {args.promote}")
    else:
        print(f"next: stream-ml models promote {version} --stage production")
    return 0
