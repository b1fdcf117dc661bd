"""sap-server: the provider's command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sap_common.openmp import prefer_short_spin

prefer_short_spin()  # before the imports below load torch (sap_common/openmp.py)

from sap_common.devices import (
    DEVICE_CHOICES,
    DTYPES,
    default_max_memory,
    device_arg,
    dtype_arg,
    parse_max_memory,
    resolve_device,
)
from sap_common.errors import SapError
from sap_common.models.registry import ALIASES, DEFAULT_MODEL
from sap_common.peft import PEFT_METHODS, PeftConfig
from sap_server.generation import DEFAULT_GENERATION_TIMEOUT, DEFAULT_MAX_GENERATIONS
from sap_server.session import DEFAULT_CHECKPOINT_EVERY, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_BATCH_TOKENS

log = logging.getLogger("sap_server")


def build_parser() -> argparse.ArgumentParser:
    aliases = "; ".join(f"{name}: {what}" for name, what in ALIASES.items())
    parser = argparse.ArgumentParser(
        prog="sap-server",
        description="Serve the top of a pretrained model for split fine-tuning (Split-and-Privatize). "
        "Users download the bottom blocks, run them locally, and send (noisy) hidden states; "
        "this server runs the top blocks with PEFT and never sees text or labels.",
    )
    # Every flag a container needs has an environment default ($SAP_*), so images are configured the usual way.
    env = os.environ.get
    parser.add_argument(
        "--model",
        default=env("SAP_MODEL", DEFAULT_MODEL),
        help=f"model alias or local Hugging Face folder (default $SAP_MODEL or {DEFAULT_MODEL}). Aliases: {aliases}",
    )
    parser.add_argument(
        "--split",
        type=int,
        default=env("SAP_SPLIT", 6),
        help="k: blocks 0..k-1 go to the user, k..L-1 stay here; 0 = embeddings only (default $SAP_SPLIT or 6)",
    )
    parser.add_argument(
        "--peft",
        choices=PEFT_METHODS,
        default=env("SAP_PEFT", "lora"),
        help="how the top is tuned (default $SAP_PEFT or lora)",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    parser.add_argument("--adapter-size", type=int, default=64, help="Adapter bottleneck width (default 64)")
    parser.add_argument(
        "--host",
        default=env("SAP_HOST", "127.0.0.1"),
        help="address to listen on (default $SAP_HOST or 127.0.0.1; 0.0.0.0 to accept other machines)",
    )
    parser.add_argument(
        "--port", type=int, default=env("SAP_PORT", 50051), help="port (default $SAP_PORT or 50051; 0 picks a free one)"
    )
    parser.add_argument(
        "--device",
        type=device_arg,
        default=env("SAP_DEVICE", "auto"),
        metavar=DEVICE_CHOICES,
        help="where the top runs: auto = cuda when torch sees a GPU, else cpu (default $SAP_DEVICE "
        "or auto); tensors on the wire are always CPU",
    )
    parser.add_argument(
        "--dtype",
        type=dtype_arg,
        default=env("SAP_DTYPE", "float32"),
        metavar="|".join(DTYPES),
        help="dtype of the top's weights, PEFT parameters and head (default $SAP_DTYPE or float32); "
        "users' bottoms stay float32 and logits go back as float32",
    )
    parser.add_argument(
        "--device-map",
        choices=("none", "balanced"),
        default=env("SAP_DEVICE_MAP", "none"),
        help="balanced: a top too large for one GPU is spread over several, contiguous blocks per "
        "device, about equal shares (as transformers' device_map='balanced'); each session's "
        "head goes to the last device (default $SAP_DEVICE_MAP or none: all on --device)",
    )
    parser.add_argument(
        "--max-memory",
        metavar="DEV=SIZE,...",
        default=os.environ.get("SAP_MAX_MEMORY") or None,
        help="with --device-map balanced: the devices to use, in order, and what each may hold, "
        "e.g. cuda:0=20GiB,cuda:1=20GiB (a cpu=... entry lets the last blocks run on the CPU); "
        "default $SAP_MAX_MEMORY or every visible GPU at 90%% of its free memory",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=os.environ.get("SAP_STATE_DIR") or None,
        help="folder for what must survive a restart (default $SAP_STATE_DIR; without it, memory "
        "only): kept adapters (DIR/adapters), so users can reattach for prediction, and "
        "session checkpoints (DIR/sessions): a server killed even with SIGKILL and started "
        "again with the same DIR knows every checkpointed session and loads it on its first "
        "call, so `sap-client resume RUN_DIR` can continue the run",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        default=env("SAP_CHECKPOINT_EVERY", DEFAULT_CHECKPOINT_EVERY),
        help="with --state-dir: checkpoint each session (trainable weights, optimizer state, step) "
        "every N steps, before replying, and when it opens, is unloaded or closes; the two "
        "latest per session are kept "
        f"(default $SAP_CHECKPOINT_EVERY or {DEFAULT_CHECKPOINT_EVERY})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        default=env("SAP_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT),
        help="a session without a call for this long leaves memory: with --state-dir it is "
        "checkpointed and unloaded (its next call loads it again), without --state-dir it is "
        "closed (its next call gets NOT_FOUND); 0 = never "
        f"(default $SAP_IDLE_TIMEOUT or {DEFAULT_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="write every received hidden-state tensor and mask, and every gradient Backward receives, "
        "to DIR: the curious provider's "
        "view, for `sap-client audit --recorded DIR` (off by default; never use it on "
        "users who have not agreed to it)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=16,
        help="most sessions held in memory at once (default 16); sessions unloaded for idleness "
        "or kept on disk by a restarted server do not count until they are loaded again",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="N",
        default=env("SAP_MAX_BATCH_TOKENS", DEFAULT_MAX_BATCH_TOKENS),
        help="most batch x length one Forward/Evaluate may carry; larger requests get "
        f"RESOURCE_EXHAUSTED (default $SAP_MAX_BATCH_TOKENS or {DEFAULT_MAX_BATCH_TOKENS})",
    )
    parser.add_argument(
        "--max-generations",
        type=int,
        metavar="N",
        default=DEFAULT_MAX_GENERATIONS,
        help="most split generations (sap-client generate) running at once, each with its own key/value cache; "
        f"more get RESOURCE_EXHAUSTED (default {DEFAULT_MAX_GENERATIONS})",
    )
    parser.add_argument(
        "--generation-timeout",
        type=float,
        metavar="SECONDS",
        default=DEFAULT_GENERATION_TIMEOUT,
        help="a generation whose next token does not arrive within this long ends and its cache is freed "
        f"(default {DEFAULT_GENERATION_TIMEOUT:g})",
    )
    parser.add_argument(
        "--start-adapter",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="offer a noise-robust starting adapter (written by python -m sap_server.robust for this model, split "
        "and PEFT) under NAME; a user's `sap-client train --start-adapter NAME` starts its top from it. Repeatable",
    )
    security = parser.add_argument_group(
        "security",
        "Every session is guarded by a random secret that only its opener learns. These add API keys "
        "and TLS; without TLS, use a private network or an SSH tunnel.",
    )
    security.add_argument(
        "--api-keys",
        type=Path,
        default=env("SAP_API_KEYS") or None,
        metavar="FILE",
        help="require an API key (one per line in FILE; '#' starts a comment line) to fetch the "
        "server info and bottom and to open sessions (default $SAP_API_KEYS; none: open)",
    )
    security.add_argument(
        "--tls-cert",
        type=Path,
        default=env("SAP_TLS_CERT") or None,
        metavar="PEM",
        help="serve TLS with this certificate chain (default $SAP_TLS_CERT); needs --tls-key",
    )
    security.add_argument(
        "--tls-key",
        type=Path,
        default=env("SAP_TLS_KEY") or None,
        metavar="PEM",
        help="the certificate's private key (default $SAP_TLS_KEY)",
    )
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        default=env("SAP_TLS_CLIENT_CA") or None,
        metavar="PEM",
        help="mutual TLS: require every client to present a certificate signed by this CA (default $SAP_TLS_CLIENT_CA)",
    )
    parser.add_argument("--workers", type=int, default=8, help="RPC worker threads (default 8)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("SAP_METRICS_PORT") or -1),
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (sessions loaded, steps, bytes, compute queue, "
        "checkpoint time; 0 picks a free port, printed at start); default $SAP_METRICS_PORT, else off",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (exit 2 naming the bad flag); args.peft and args.start_adapters are resolved."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if not -1 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    if args.split < 0:
        parser.error(f"--split must be >= 0, got {args.split}")
    for flag, value in (
        ("--max-sessions", args.max_sessions),
        ("--workers", args.workers),
        ("--max-batch-tokens", args.max_batch_tokens),
        ("--checkpoint-every", args.checkpoint_every),
        ("--max-generations", args.max_generations),
    ):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not (args.generation_timeout > 0 and math.isfinite(args.generation_timeout)):
        parser.error(f"--generation-timeout must be a number of seconds > 0, got {args.generation_timeout}")
    if not (args.idle_timeout >= 0 and math.isfinite(args.idle_timeout)):
        parser.error(f"--idle-timeout must be a number of seconds >= 0 (0 = never), got {args.idle_timeout}")
    if args.max_memory is not None and args.device_map != "balanced":
        parser.error("--max-memory goes with --device-map balanced")
    if args.max_memory is not None:
        try:
            parse_max_memory(args.max_memory)
        except ValueError as exc:
            parser.error(str(exc))
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together (the certificate and its private key)")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    start_adapters = []
    for entry in args.start_adapter:
        name, sep, file = entry.partition("=")
        if not sep or not name or not file:
            parser.error(f"--start-adapter takes NAME=FILE, got {entry!r}")
        start_adapters.append((name, Path(file)))
    try:
        peft = PeftConfig(
            method=args.peft, lora_r=args.lora_r, lora_alpha=args.lora_alpha, adapter_size=args.adapter_size
        )
    except ValueError as exc:
        parser.error(str(exc))
    args.peft, args.start_adapters = peft, start_adapters
    return args


@dataclass
class Running:
    """A started server (sap-server's main, or a cluster replica): what serving it and stopping it need."""

    server: Any  # grpc.Server
    port: int
    provider: Any  # sap_server.provider.Provider
    metrics: Any  # sap_server.metrics.ServerMetrics | None
    metrics_port: int | None
    device: str
    security: str

    def close(self) -> None:
        """After the server stopped: checkpoint every loaded session (with --state-dir), free the model."""
        self.provider.sessions.stop_reaper()
        if self.provider.sessions.store is not None:  # a graceful stop: sessions continue where they stood
            log.info("checkpointed %d sessions", self.provider.sessions.checkpoint_loaded())
        self.provider.close()
        if self.metrics is not None:
            self.metrics.close()


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch at run time
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def start(args: argparse.Namespace) -> Running:
    """Load the model and start serving (parse_args' args); SapError, OSError, RuntimeError (gRPC refusing the TLS
    files) or ValueError (the top does not fit --max-memory) when it cannot."""
    from sap_server.app import start_server
    from sap_server.auth import ApiKeys, ServerTls
    from sap_server.compute import compute_thread
    from sap_server.generation import Generations
    from sap_server.metrics import ServerMetrics
    from sap_server.provider import Provider

    # Credentials first: a missing file fails in a second, not after the model has loaded.
    api_keys = ApiKeys.from_file(args.api_keys) if args.api_keys is not None else None
    tls = ServerTls.from_files(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    device = resolve_device(args.device)
    max_memory = None
    if args.device_map == "balanced":
        max_memory = parse_max_memory(args.max_memory) if args.max_memory else default_max_memory()
        for spread in max_memory:
            resolve_device(str(spread))  # each must exist here
        device = next(iter(max_memory))
    # Loaded on the thread that will run every step (sap_server/compute.py: one OpenMP team).
    provider = compute_thread().run(
        Provider.load,
        args.model,
        args.split,
        args.peft,
        dtype=DTYPES[args.dtype],
        device=device,
        max_sessions=args.max_sessions,
        state_dir=args.state_dir,
        record_dir=args.record,
        max_batch_tokens=args.max_batch_tokens,
        checkpoint_every=args.checkpoint_every,
        idle_timeout=args.idle_timeout,
        max_memory=max_memory,
    )
    for name, file in args.start_adapters:
        provider.offer_start_adapter(name, file)
    generations = Generations(args.max_generations, args.generation_timeout)
    metrics, metrics_port = None, None
    if args.metrics_port >= 0:
        metrics = ServerMetrics(lambda: len(provider.sessions), compute_thread().depth)
        provider.sessions.checkpoint_seconds = metrics.checkpoint_written
        metrics_port = metrics.serve(args.host, args.metrics_port)
    server, port = start_server(
        provider,
        args.host,
        args.port,
        workers=args.workers,
        api_keys=api_keys,
        tls=tls,
        generations=generations,
        metrics=metrics,
    )
    security = "; ".join(
        (
            ("mutual TLS" if tls.mutual else "TLS") if tls else "no TLS",
            f"{len(api_keys)} API keys" if api_keys else "no API keys (anyone who reaches the port may open sessions)",
        )
    )
    return Running(server, port, provider, metrics, metrics_port, str(device), security)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    from sap_server.app import serve_until_signal

    try:
        running = start(args)
    except (SapError, OSError, RuntimeError, ValueError) as exc:
        print(f"sap-server: error: {exc}", file=sys.stderr)
        return 1
    info = running.provider.info
    log.info(
        "serving %s (%s), split %d of %d blocks, %s, top on %s in %s",
        info.model_id,
        info.model_type,
        info.split,
        info.total_blocks,
        info.peft,
        running.device,
        args.dtype,
    )
    log.info("security: %s", running.security)
    if args.state_dir is not None:
        log.info(
            "state dir %s: sessions checkpointed every %d steps; idle sessions unloaded after %g s",
            args.state_dir,
            args.checkpoint_every,
            args.idle_timeout,
        )
    elif args.idle_timeout:
        log.info(
            "no --state-dir: sessions are not checkpointed, and a session idle for %g s is closed", args.idle_timeout
        )
    if args.tls_cert is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without TLS: hidden states and session secrets travel in the clear; "
            "use --tls-cert/--tls-key, a private network or an SSH tunnel",
            args.host,
        )
    try:
        ready = f"sap-server listening on {args.host}:{running.port}"
        if running.metrics_port is not None:
            ready += f"\nsap-server metrics on http://{args.host}:{running.metrics_port}/metrics"
        serve_until_signal(running.server, on_ready=lambda: print(ready, flush=True))
    finally:
        running.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
