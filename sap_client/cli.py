"""sap-client: the user's command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from sap_common.openmp import prefer_short_spin

prefer_short_spin()  # before the imports below load torch (sap_common/openmp.py)

from sap_client.cti import CTI_MODES
from sap_client.privacy import CTI_ROWS
from sap_client.trainer import TrainConfig
from sap_common.devices import DEVICE_CHOICES, DTYPES, device_arg, resolve_device
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
    train = commands.add_parser(
        "train",
        help="fine-tune through a sap-server on a labelled CSV, or a decoder on a JSONL of completions",
        description="Fine-tune through a sap-server on a labelled CSV "
        "(a header row; one text column and one label column), or, with a DATA.jsonl, fine-tune the server's "
        "decoder to write completions (one example per line: messages, prompt/completion or text; see --format; "
        "held-out perplexity before and after in metrics.json; not resumable yet). While it "
        "runs, RUN_DIR holds a checkpoint (written whenever the server, run "
        "with --state-dir, checkpoints the session): a run cut short, by a "
        "server restart or this process being killed, continues with "
        "`sap-client resume RUN_DIR`.",
    )
    train.add_argument(
        "data", type=Path, metavar="DATA.csv|DATA.jsonl", nargs="?", help="training data (.jsonl: generative)"
    )
    train.add_argument(
        "--format",
        default="auto",
        choices=["auto", "messages", "prompt-completion", "text"],
        help="DATA.jsonl's format (default: detected from its first example)",
    )
    train.add_argument(
        "--loss-on",
        default="completion",
        choices=["completion", "all"],
        help="DATA.jsonl: learn the completions / assistant turns only (default), or every token",
    )
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help=argparse.SUPPRESS)  # now `sap-client resume`
    train.add_argument(
        "--server",
        default=os.environ.get("SAP_SERVER", DEFAULT_SERVER),
        help=f"sap-server address HOST:PORT (default $SAP_SERVER or {DEFAULT_SERVER})",
    )
    train.add_argument("--text-column", default="text", help="column holding the text (default text)")
    train.add_argument(
        "--label-column",
        default="label",
        help="column holding the label (default label); labels may be strings or integers",
    )
    held = train.add_mutually_exclusive_group()
    held.add_argument("--eval", type=Path, metavar="EVAL.csv", help="held-out data with the same columns")
    held.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="without --eval: stratified fraction of DATA held out (default 0.1)",
    )
    train.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help="passes over the data (default %(default)s)"
    )
    train.add_argument(
        "--batch-size", type=int, default=TrainConfig.batch_size, help="examples per step (default %(default)s)"
    )
    train.add_argument(
        "--lr", type=float, default=TrainConfig.learning_rate, help="AdamW learning rate (default %(default)s)"
    )
    train.add_argument(
        "--max-length",
        type=int,
        default=TrainConfig.max_length,
        help="tokens per text after truncation (default %(default)s)",
    )
    train.add_argument("--max-examples", type=int, help="use only the first N rows of DATA")
    train.add_argument(
        "--seed", type=int, default=TrainConfig.seed, help="seed of split, data order and initial weights"
    )
    train.add_argument(
        "--train-bottom",
        action="store_true",
        help="also fine-tune the bottom blocks here (the server returns dL/dhidden); the bottom moves away from the "
        "pretrained weights the provider's attacks invert through (privacy.md)",
    )
    train.add_argument(
        "--bottom-lr",
        type=float,
        default=TrainConfig.bottom_learning_rate,
        help="AdamW learning rate of the bottom with --train-bottom (default %(default)s: all of its weights train; "
        "a deeper bottom wants less: on MiniLM split 4, 1e-4 fell to chance in one seed of three and 1e-5 kept "
        "no-noise accuracy in three)",
    )
    train.add_argument(
        "--learned-filter",
        action="store_true",
        help="before the first step, train a filter here between the bottom and the noise (task loss plus an "
        "inversion model's confusion) and send filter(h) + noise; needs --noise-ratio or --eta. The audit assumes "
        "the provider knows the filter (privacy.md)",
    )
    train.add_argument(
        "--filter-steps",
        type=int,
        default=TrainConfig.filter_steps,
        help="training steps of --learned-filter (default %(default)s)",
    )
    train.add_argument(
        "--filter-privacy-weight",
        type=float,
        default=TrainConfig.filter_privacy_weight,
        help="weight of the inversion model's confusion in --learned-filter's training (default %(default)s)",
    )
    train.add_argument(
        "--private-head",
        action="store_true",
        help="keep the task head here: the server returns the pooled representation (B, H) and receives "
        "dL/dpooled, never logits, dL/dlogits or the number of classes. The labels are still readable from "
        "dL/dpooled (see privacy.md and the README's label table)",
    )
    train.add_argument(
        "--user-tail",
        type=int,
        default=0,
        metavar="M",
        help="with the head here (implies --private-head), also run the model's last M blocks here with this "
        "side's own LoRA: the server stops M blocks early and returns packed hidden states; the tail's "
        "pretrained weights are downloaded once into RUN_DIR/tail (default %(default)s)",
    )
    train.add_argument(
        "--label-epsilon",
        type=float,
        metavar="EPS",
        help="label differential privacy: train on each label replaced once by randomized response with this "
        "epsilon (kept with probability e^EPS / (e^EPS + K - 1)); evaluation uses the true labels",
    )
    train.add_argument(
        "--label-mechanism",
        choices=("rr", "rr-prior"),
        default="rr",
        help="with --label-epsilon: plain randomized response, or RR-with-prior (Ghazi et al. 2021), which "
        "randomizes within the most likely classes of the training prior (default %(default)s)",
    )
    train.add_argument(
        "--start-adapter",
        default="",
        metavar="NAME",
        help="start the server's top from its noise-robust starting adapter NAME (sap-server --start-adapter; a name "
        "it does not offer is refused with the list): PEFT weights the provider trained on its own public text to "
        "undo d_chi noise at one noise ratio. What is sent is unchanged, and so is the privacy",
    )
    train.add_argument(
        "--out", type=Path, help="run folder for metrics.json and run.json (default runs/YYYYmmdd-HHMMSS)"
    )
    _add_device_flag(train)
    _add_wire_flag(train, default="float32")
    _add_noise_flags(train)
    _add_connection_flags(train)

    resume = commands.add_parser(
        "resume",
        help="continue a training run cut short, from its latest checkpoint",
        description="Continue the unfinished `sap-client train` run in RUN_DIR (classification or generative) "
        "from its latest checkpoint, with the run's own data and settings (training, noise and CTI settings, "
        "seeds, noise key): only where "
        "to connect and the device may be given. The server must still have the run's session (a restarted "
        "server needs the same --state-dir). Ends with the same metrics and weights as an uninterrupted run.",
    )
    resume.add_argument("run", type=Path, metavar="RUN_DIR", help="the --out of the unfinished `sap-client train`")
    resume.add_argument(
        "--server",
        default=os.environ.get("SAP_SERVER"),
        help="sap-server HOST:PORT (default $SAP_SERVER, else the run's server)",
    )
    _add_device_flag(resume)
    _add_connection_flags(resume)

    for name, what in (
        ("predict", "write predictions for a CSV through a trained run"),
        ("evaluate", "accuracy and macro-F1 of a trained run on a labelled CSV"),
    ):
        cmd = commands.add_parser(
            name,
            help=what,
            description=what.capitalize() + ", with the run's split, "
            "noise settings and kept adapter (works from a new process, and after a server "
            "restart with the same --state-dir).",
        )
        cmd.add_argument("data", type=Path, metavar="DATA.csv")
        _add_device_flag(cmd)
        _add_wire_flag(cmd, default=None)
        cmd.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="the --out of sap-client train")
        cmd.add_argument(
            "--server",
            default=os.environ.get("SAP_SERVER"),
            help="sap-server HOST:PORT (default $SAP_SERVER, else the run's server)",
        )
        cmd.add_argument("--text-column", help="default: the run's text column")
        if name == "predict":
            cmd.add_argument(
                "--out", type=Path, required=True, metavar="PREDS.csv", help="output: row, label, p_<label> per class"
            )
        else:
            cmd.add_argument("--label-column", help="default: the run's label column")
            cmd.add_argument(
                "--out",
                type=Path,
                metavar="EVAL.json",
                help="where to write the figures (default RUN_DIR/evaluation.json)",
            )
        _add_connection_flags(cmd)
    gen = commands.add_parser(
        "generate",
        help="write completions with a generatively fine-tuned run, through the split",
        description="Generate text with the run of `sap-client train DATA.jsonl` in RUN_DIR: the prompt goes "
        "through your bottom, the run's noise and the provider's kept adapter, and your tail, final norm and "
        "output layer choose each next token here (no token id or vocabulary-sized tensor is sent). Tokens are "
        "printed as they come; generation stops at the end-of-sequence token or --max-new-tokens. Each piece's "
        "noise is keyed by the run's secret and the tokens so far, so the same prompt (and --seed) sends exactly "
        "the same vectors again. What the provider can read of the prompt and the text: RUN_DIR/privacy.md.",
    )
    gen.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="the --out of sap-client train")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt (a user turn for a run trained on messages)")
    source.add_argument(
        "--data",
        type=Path,
        metavar="PROMPTS.jsonl",
        help='one prompt per line: {"prompt": ...}, {"messages": [...]} or {"text": ...}',
    )
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens per prompt (128)")
    gen.add_argument("--temperature", type=float, default=0.7, metavar="T", help="sampling temperature (0.7)")
    gen.add_argument(
        "--top-p", type=float, default=0.9, metavar="P", help="sample from the smallest set reaching P (0.9)"
    )
    gen.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed, with the prompt and the run's secret (0)")
    gen.add_argument("--out", type=Path, metavar="OUT.jsonl", help="also write each prompt with its completion here")
    gen.add_argument(
        "--server",
        default=os.environ.get("SAP_SERVER"),
        help="sap-server HOST:PORT (default $SAP_SERVER, else the run's server)",
    )
    _add_device_flag(gen)
    _add_wire_flag(gen, default=None)
    _add_connection_flags(gen)
    audit = commands.add_parser(
        "audit",
        help="measure how much your split and noise protect (privacy audit)",
        description="Play the honest-but-curious provider on exactly what this client would "
        "send for these settings (or, with --recorded, on what a `sap-server "
        "--record` server received): embedding inversion (token recovery) with "
        "every attack that applies, the strongest reported; with "
        "--attribute-column, attribute inference; with --recorded and labels, "
        "label inference from the recorded gradients. Writes "
        "REPORT_DIR/report.json and report.md.",
    )
    audit.add_argument(
        "data",
        type=Path,
        metavar="DATA.csv",
        help="the texts attacked (with --run of a generative run: its DATA.jsonl)",
    )
    audit.add_argument(
        "--server",
        default=os.environ.get("SAP_SERVER", DEFAULT_SERVER),
        help=f"sap-server HOST:PORT, for the bottom (default $SAP_SERVER or {DEFAULT_SERVER})",
    )
    audit.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    audit.add_argument("--text-column", default="text")
    audit.add_argument("--label-column", default="label", help="used by CTI when present (default label)")
    audit.add_argument("--attribute-column", help="private attribute to attack with attribute inference")
    audit.add_argument("--max-examples", type=int, default=64, help="texts attacked (default 64)")
    audit.add_argument(
        "--run",
        type=Path,
        metavar="RUN_DIR",
        help="audit a finished run: its noise settings, CTI statistics and noise key",
    )
    audit.add_argument("--recorded", type=Path, metavar="DIR", help="attack a `sap-server --record DIR` recording")
    audit.add_argument(
        "--attack",
        default="auto",
        metavar="auto|nn|optimization|sequential|learned",
        help="auto (default): every attack that applies, the strongest reported: nn at k = 0, "
        "optimization at k >= 1, sequential for decoders at k >= 1, learned with public text; "
        "or one of them alone",
    )
    audit.add_argument(
        "--public",
        type=Path,
        metavar="PUBLIC.csv",
        help="the provider's own public text (same text column) for the probe and the learned "
        "inverter (default: the rows of DATA after the attacked ones, the same domain: the "
        "worst case); attacked texts are always left out",
    )
    audit.add_argument("--public-examples", type=int, default=2000, help="public texts used (default 2000)")
    audit.add_argument("--beam", type=int, default=4, help="sequential attack: hypotheses kept (default 4)")
    audit.add_argument(
        "--shortlist",
        type=int,
        nargs=3,
        default=(64, 64, 32),
        metavar=("PROBE", "EMBED", "GRAD"),
        help="sequential attack: candidates per position from the ridge probe, the embedding "
        "similarity and the gradient signal (default 64 64 32)",
    )
    audit.add_argument(
        "--inverter-epochs",
        type=int,
        default=6,
        help="learned attack: passes over the public text, a fresh noise draw each (default 6)",
    )
    audit.add_argument("--steps", type=int, default=400, help="optimization attack steps (default 400)")
    audit.add_argument("--attack-lr", type=float, default=0.03, help="optimization attack Adam lr (default 0.03)")
    audit.add_argument("--temperature", type=float, default=0.2, help="softmax temperature (default 0.2)")
    audit.add_argument(
        "--observations",
        default="1,4",
        help="comma-separated counts of noisy copies the provider averages (default 1,4)",
    )
    audit.add_argument("--batch-size", type=int, default=16)
    audit.add_argument("--max-length", type=int, default=64)
    audit.add_argument("--seed", type=int, default=0)
    _add_device_flag(audit)
    _add_noise_flags(audit)
    _add_connection_flags(audit)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("connection security (for a server with --api-keys or TLS)")
    group.add_argument(
        "--api-key",
        default=env("SAP_API_KEY") or None,
        metavar="KEY",
        help="the provider's API key (default $SAP_API_KEY; prefer the variable: a command line "
        "is visible to other users of this machine)",
    )
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=env("SAP_TLS_CA") or None,
        metavar="PEM",
        help="connect with TLS, trusting the server's certificate if this CA signed it (default $SAP_TLS_CA)",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=env("SAP_TLS_CERT") or None,
        metavar="PEM",
        help="mutual TLS: this client's certificate (default $SAP_TLS_CERT); needs --tls-key",
    )
    group.add_argument(
        "--tls-key",
        type=Path,
        default=env("SAP_TLS_KEY") or None,
        metavar="PEM",
        help="the client certificate's private key (default $SAP_TLS_KEY)",
    )


def _credentials(args: argparse.Namespace):
    """The connection flags as sap_client.remote.ClientCredentials."""
    from sap_client.remote import ClientCredentials

    return ClientCredentials(api_key=args.api_key, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=device_arg,
        default=os.environ.get("SAP_DEVICE", "auto"),
        metavar=DEVICE_CHOICES,
        help="where the bottom runs: auto = cuda when torch sees a GPU, "
        "else cpu (default $SAP_DEVICE or auto); noise is drawn and tensors are sent from the CPU",
    )


def _add_wire_flag(parser: argparse.ArgumentParser, *, default: str | None) -> None:
    parser.add_argument(
        "--wire-dtype",
        choices=tuple(DTYPES),
        default=default,
        help="dtype of the hidden states sent to the server: float32 is lossless, bfloat16 and "
        "float16 halve the bytes " + ("(default float32)" if default else "(default: the run's wire dtype)"),
    )


def _add_noise_flags(parser: argparse.ArgumentParser) -> None:
    noise = parser.add_argument_group("privacy noise (d_chi-privacy on every token vector sent)")
    level = noise.add_mutually_exclusive_group()
    level.add_argument(
        "--eta",
        type=_eta,
        default=None,
        metavar="ETA|none",
        help="noise parameter: E||noise|| = hidden_size / ETA, so smaller is noisier; "
        "'none' (the default) sends clean vectors",
    )
    level.add_argument(
        "--noise-ratio",
        type=float,
        metavar="R",
        help="set eta so the expected noise norm is R times the mean hidden-state norm "
        "measured on the training data (nearest-neighbour inversion at k=0 on MiniLM: "
        "R<=3 recovers >95%% of tokens, R=4 ~71%%, R=6 ~20%%, R=8 ~7%%)",
    )
    noise.add_argument(
        "--cti",
        action="store_true",
        help="contributing token identification: task-critical tokens get less noise "
        "(statistics from the training split, kept in RUN_DIR)",
    )
    noise.add_argument(
        "--cti-mode",
        choices=CTI_MODES,
        default="scale",
        help="scale: eta x max(importance, floor); exempt: no noise on the top tokens per class",
    )
    noise.add_argument("--cti-floor", type=float, default=0.6, help="scale mode floor (default 0.6)")
    noise.add_argument("--cti-top", type=float, default=0.1, help="exempt mode: fraction per class (default 0.1)")
    noise.add_argument(
        "--cti-rows",
        choices=CTI_ROWS,
        default="label",
        help="label (default, DESIGN's rule): a training text's eta comes from its own class's "
        "row, so the noise level depends on the label; max: every text uses the max over "
        "classes, as at inference, so it does not",
    )
    noise.add_argument(
        "--rescale-noised",
        action="store_true",
        help="send every noised vector rescaled to the mean hidden-state norm of the training data "
        "(measured here, kept in RUN_DIR; predict and audit use it too). Post-processing of the "
        "d_chi output: the same guarantee, and the audit (whose attacker undoes the rescaling "
        "first) measures the same privacy. The noisy vectors no longer outweigh clean ones in the "
        "top's attention, which is what lets CTI pay (privacy table, MiniLM k=4: +3-5 accuracy "
        "points without CTI, CTI 1-2 points above that)",
    )
    noise.add_argument(
        "--fresh-noise",
        action="store_true",
        help="draw new noise every epoch (default: each example's noisy vectors are drawn once "
        "and re-sent, since averaging several noisy copies strips the noise)",
    )


def _eta(value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        eta = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {value!r}") from None
    if not math.isfinite(eta) or eta <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {value!r}")
    return eta


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_train(args: argparse.Namespace, config, noise, device) -> int:
    from sap_client.commands import train

    out = args.run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    metrics = train(
        args.data,
        server=args.server,
        out=out,
        config=config,
        noise=noise,
        text_column=args.text_column,
        label_column=args.label_column,
        eval_path=args.eval,
        eval_fraction=args.eval_fraction,
        max_examples=args.max_examples,
        device=device,
        wire_dtype=args.wire_dtype,
        credentials=_credentials(args),
    )
    _print_trained(metrics, out)
    return 0


def run_train_generative(args: argparse.Namespace, config, noise, device) -> int:
    from sap_client.commands import train_generative

    out = args.run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    metrics = train_generative(
        args.data,
        server=args.server,
        out=out,
        config=config,
        noise=noise,
        data_format=args.format,
        loss_on=args.loss_on,
        eval_path=args.eval,
        eval_fraction=args.eval_fraction,
        max_examples=args.max_examples,
        device=device,
        wire_dtype=args.wire_dtype,
        credentials=_credentials(args),
    )
    _print_trained(metrics, out)
    return 0


def run_resume(args: argparse.Namespace, device) -> int:
    from sap_client.commands import resume

    args.run_dir = args.run
    metrics = resume(args.run, server=args.server, device=device, credentials=_credentials(args))
    _print_trained(metrics, args.run)
    return 0


def _print_trained(metrics: dict, out: Path) -> None:
    resumed = f", resumed at step {metrics['resumed_at_steps'][-1]}" if metrics.get("resumed_at_steps") else ""
    if metrics.get("task") == "generative":
        noise_note = f"noise eta {metrics['eta']:.4g}" if metrics["eta"] else "no noise"
        print(
            f"eval perplexity {metrics['eval_perplexity_before']:.3f} -> {metrics['eval_perplexity']:.3f} after "
            f"{metrics['steps']} steps ({metrics['seconds']:.1f} s, {noise_note}{resumed}); run in {out}"
        )
        return
    noise_note = (
        f"noise eta {metrics['eta']:.4g} (noise/signal {metrics['noise_to_signal']:.2f}"
        f"{', CTI' if metrics['cti'] else ''})"
        if metrics["eta"]
        else "no noise"
    )
    print(
        f"eval accuracy {metrics['eval_accuracy']:.4f} after {metrics['steps']} steps "
        f"({metrics['seconds']:.1f} s, {noise_note}{resumed}); run in {out}"
    )


def run_predict(args: argparse.Namespace, device) -> int:
    from sap_client.commands import predict

    rows = predict(
        args.data,
        run_path=args.run,
        server=args.server,
        out=args.out,
        text_column=args.text_column,
        device=device,
        wire_dtype=args.wire_dtype,
        credentials=_credentials(args),
    )
    print(f"{rows} predictions written to {args.out}")
    return 0


def run_evaluate(args: argparse.Namespace, device) -> int:
    from sap_client.commands import evaluate

    figures = evaluate(
        args.data,
        run_path=args.run,
        server=args.server,
        text_column=args.text_column,
        label_column=args.label_column,
        device=device,
        wire_dtype=args.wire_dtype,
        credentials=_credentials(args),
    )
    out = args.out or args.run / "evaluation.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"accuracy {figures['accuracy']:.4f}, macro-F1 {figures['macro_f1']:.4f} on {figures['examples']} "
        f"examples; written to {out}"
    )
    return 0


def run_generate(args: argparse.Namespace, sampling, device) -> int:
    from sap_client.commands import generate
    from sap_client.sft_data import read_prompts

    prompts = [{"prompt": args.prompt}] if args.prompt is not None else read_prompts(args.data)
    many = len(prompts) > 1
    current = [-1]

    def show(index: int, text: str) -> None:
        if index != current[0]:
            if current[0] >= 0:
                print(flush=True)
            if many:
                print(f"[{index + 1}] ", end="")
            current[0] = index
        print(text, end="", flush=True)

    result = generate(
        args.run,
        prompts,
        server=args.server,
        sampling=sampling,
        device=device,
        wire_dtype=args.wire_dtype,
        credentials=_credentials(args),
        on_text=show,
    )
    print(flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", encoding="utf-8") as handle:
            for row in result["completions"]:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(
        f"{result['generated_tokens']} tokens for {len(prompts)} prompt{'s' if many else ''} in "
        f"{result['seconds']:.1f} s ({result['tokens_per_second']:.1f} tokens/s, "
        f"{result['wire_bytes_per_token']:.0f} wire bytes per token)"
        + (f"; written to {args.out}" if args.out is not None else ""),
        file=sys.stderr,
    )
    return 0


def run_audit(args: argparse.Namespace, noise, attack, device) -> int:
    from sap_client.commands import audit

    report = audit(
        args.data,
        server=args.server,
        out=args.out,
        noise=noise,
        attack=attack,
        text_column=args.text_column,
        label_column=args.label_column,
        attribute_column=args.attribute_column,
        max_examples=args.max_examples,
        run_path=args.run,
        recorded=args.recorded,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=device,
        credentials=_credentials(args),
        public_path=args.public,
        public_examples=args.public_examples,
    )
    line = (
        f"token recovery {report['eia_token_recovery']:.1%}, content tokens "
        f"{report['eia_token_recovery_content']:.1%} (empirical privacy {report['eia_privacy']:.3f}, strongest of "
        f"{', '.join(report['eia_attacks'])}: {report['attack']})"
    )
    if "aia_accuracy" in report:
        line += f"; attribute inference {report['aia_accuracy']:.3f} vs baseline {report['aia_baseline']:.3f}"
    if "targets_read" in report:
        line += f"; target tokens read from the gradients {report['targets_read']:.1%} of {report['target_tokens']}"
    if "label_inference_accuracy" in report:
        line += (
            f"; labels read {report['label_inference_accuracy']:.1%} vs baseline "
            f"{report['label_inference_baseline']:.1%}"
        )
    print(f"{line}; report in {args.out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    noise = attack = config = None
    if args.command in ("train", "audit"):
        from sap_client.privacy import NoiseConfig

        try:
            noise = NoiseConfig(
                eta=args.eta,
                noise_ratio=args.noise_ratio,
                cti=args.cti,
                cti_mode=args.cti_mode,
                cti_floor=args.cti_floor,
                cti_top=args.cti_top,
                cti_rows=args.cti_rows,
                fresh_noise=args.fresh_noise,
                rescale_noised=args.rescale_noised,
            )
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "audit":
        from sap_client.audit.attacks import AttackConfig
        from sap_client.audit.learned import LearnedConfig
        from sap_client.audit.sequential import SequentialConfig

        try:
            observations = tuple(int(n) for n in args.observations.split(","))
            probe, embed, grad = args.shortlist
            attack = AttackConfig(
                attack=args.attack,
                steps=args.steps,
                lr=args.attack_lr,
                temperature=args.temperature,
                seed=args.seed,
                observations=observations,
                sequential=SequentialConfig(
                    probe_candidates=probe, embedding_candidates=embed, gradient_candidates=grad, beam=args.beam
                ),
                learned=LearnedConfig(epochs=args.inverter_epochs, seed=args.seed),
            )
        except ValueError as exc:
            parser.error(f"audit: {exc}")
        if args.max_examples < 2:
            parser.error(f"--max-examples must be >= 2, got {args.max_examples}")
        if args.public_examples < 0:
            parser.error(f"--public-examples must be >= 0, got {args.public_examples}")
    if args.command == "train" and args.resume is not None:
        parser.error(f"train --resume is now its own command: sap-client resume {args.resume}")
    if args.command == "train" and args.data is None:
        parser.error("train: the DATA.csv argument is required")
    generative = args.command == "train" and args.data.suffix == ".jsonl"
    if args.command == "train":
        try:
            config = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                max_length=args.max_length,
                seed=args.seed,
                train_bottom=args.train_bottom,
                bottom_learning_rate=args.bottom_lr,
                learned_filter=args.learned_filter,
                filter_steps=args.filter_steps,
                filter_privacy_weight=args.filter_privacy_weight,
                private_head=args.private_head or args.user_tail > 0 or generative,
                user_tail=args.user_tail,
                label_epsilon=args.label_epsilon,
                label_mechanism=args.label_mechanism,
                start_adapter=args.start_adapter,
            )
        except ValueError as exc:
            parser.error(str(exc))
        if args.max_examples is not None and args.max_examples < 1:
            parser.error(f"--max-examples must be >= 1, got {args.max_examples}")
        if args.eval is None and not 0 < args.eval_fraction < 1:
            parser.error(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    sampling = None
    if args.command == "generate":
        from sap_client.generation import Sampling

        try:
            sampling = Sampling(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                greedy=args.greedy,
                seed=args.seed,
            )
        except ValueError as exc:
            parser.error(f"generate: {exc}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together (the client certificate and its private key)")
    _configure_logging(args.verbose)
    try:
        device = resolve_device(args.device)
        if generative:
            return run_train_generative(args, config, noise, device)
        if args.command == "train":
            return run_train(args, config, noise, device)
        if args.command == "resume":
            return run_resume(args, device)
        if args.command == "predict":
            return run_predict(args, device)
        if args.command == "evaluate":
            return run_evaluate(args, device)
        if args.command == "generate":
            return run_generate(args, sampling, device)
        if args.command == "audit":
            return run_audit(args, noise, attack, device)
    except (SapError, ValueError) as exc:
        print(f"sap-client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run_dir = getattr(args, "run_dir", None)
        hint = (
            f"; continue the run with `sap-client resume {run_dir}`"
            if run_dir is not None and (run_dir / "checkpoint.safetensors").is_file()
            else ""
        )
        print(f"sap-client: interrupted{hint}", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
