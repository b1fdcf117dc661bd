"""sap-client: the user's command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from sap_common.errors import SapError

log = logging.getLogger("sap_client")
DEFAULT_SERVER = "127.0.0.1:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sap-client",
        description="Fine-tune a provider's model on your private data through a split: the bottom blocks "
                    "run here, only hidden states leave this machine, labels and loss stay here.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="fine-tune through a sap-server on a labelled CSV",
                                description="Fine-tune through a sap-server on a labelled CSV "
                                            "(a header row; one text column and one label column).")
    train.add_argument("data", type=Path, metavar="DATA.csv", help="training data")
    train.add_argument("--server", default=os.environ.get("SAP_SERVER", DEFAULT_SERVER),
                       help=f"sap-server address HOST:PORT (default $SAP_SERVER or {DEFAULT_SERVER})")
    train.add_argument("--text-column", default="text", help="column holding the text (default text)")
    train.add_argument("--label-column", default="label", help="column holding the label (default label); "
                       "labels may be strings or integers")
    held = train.add_mutually_exclusive_group()
    held.add_argument("--eval", type=Path, metavar="EVAL.csv", help="held-out data with the same columns")
    held.add_argument("--eval-fraction", type=float, default=0.1,
                      help="without --eval: stratified fraction of DATA held out (default 0.1)")
    train.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    train.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    train.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    train.add_argument("--max-length", type=int, default=64, help="tokens per text after truncation (default 64)")
    train.add_argument("--max-examples", type=int, help="use only the first N rows of DATA")
    train.add_argument("--seed", type=int, default=0, help="seed of split, data order and initial weights")
    train.add_argument("--train-bottom", action="store_true",
                       help="also fine-tune the bottom blocks here (the server returns dL/dhidden)")
    train.add_argument("--out", type=Path, help="run folder for metrics.json and run.json "
                       "(default runs/YYYYmmdd-HHMMSS)")
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_train(args: argparse.Namespace, config) -> int:
    from sap_client.bottom import load_server_bottom
    from sap_client.data import load_labelled_csv, stratified_split
    from sap_client.remote import RemoteTopService
    from sap_client.trainer import SplitTrainer

    data = load_labelled_csv(args.data, args.text_column, args.label_column)
    if args.max_examples:
        data = data.subset(list(range(min(args.max_examples, len(data)))))
    if args.eval:
        train, held = data, load_labelled_csv(args.eval, args.text_column, args.label_column, data.label_names)
    else:
        train, held = stratified_split(data, args.eval_fraction, args.seed)
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with RemoteTopService(args.server) as service:
        info = service.server_info()
        bottom, tokenizer, _ = load_server_bottom(service, info)
        download_bytes, service.bytes_sent, service.bytes_received = service.bytes_received, 0, 0
        log.info("server %s: %s (%s), split %d/%d, %s; %d train / %d eval examples, %d classes",
                 args.server, info.model_id, info.model_type, info.split, info.total_blocks, info.peft,
                 len(train), len(held), len(data.label_names))
        trainer = SplitTrainer(bottom, tokenizer, service, config)
        session_id = trainer.open(len(data.label_names))
        metrics = trainer.fit(train, held)
        service.close_session(session_id)
        metrics.update(bytes_sent=service.bytes_sent, bytes_received=service.bytes_received, split=info.split,
                       total_blocks=info.total_blocks, peft=info.peft, model=info.model_id,
                       label_names=data.label_names, train_bottom=config.train_bottom,
                       bottom_download_bytes=download_bytes)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "run.json").write_text(json.dumps({"server": args.server, "data": str(args.data),
                                              "config": vars(config), "label_names": data.label_names,
                                              "text_column": args.text_column,
                                              "label_column": args.label_column}, indent=2) + "\n")
    print(f"eval accuracy {metrics['eval_accuracy']:.4f} after {metrics['steps']} steps "
          f"({metrics['seconds']:.1f} s); metrics in {out / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from sap_client.trainer import TrainConfig

        try:
            config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                 max_length=args.max_length, seed=args.seed, train_bottom=args.train_bottom)
        except ValueError as exc:
            parser.error(str(exc))
        if args.eval is None and not 0 < args.eval_fraction < 1:
            parser.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    _configure_logging(args.verbose)
    try:
        if args.command == "train":
            return run_train(args, config)
    except (SapError, ValueError) as exc:
        print(f"sap-client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sap-client: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
