"""The `lmforge serve` sub-command."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Serve the web app: human-evaluation arena, chat playground, run dashboard.

    Binds 127.0.0.1 by default. On first start (or with --new-organiser-token) it
    prints an organiser sign-in link; the token is stored only as a hash, so keep it.
    """
    import uvicorn

    from lmforge.serve.app import create_app
    from lmforge.serve.store import Store

    if overrides:
        raise ValueError(f"serve takes no config overrides (got {overrides})")
    runs = Path(args.runs)
    if not runs.is_dir():
        raise FileNotFoundError(f"runs folder {runs} does not exist")
    db = Path(args.db) if args.db else runs.resolve() / "serve.sqlite"
    store = Store(db)
    token = None
    if args.new_organiser_token or store.n_organisers() == 0:
        token = store.add_organiser()
    store.close()
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"warning: binding {args.host}: the app is reachable from other machines; "
            "put it behind HTTPS before sharing invitation links.",
            file=sys.stderr,
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = create_app(runs, db_path=db, device=args.device)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"lmforge serve: runs in {runs.resolve()}, store {db}", flush=True)
    if token:
        print(f"organiser sign-in: http://{shown}:{args.port}/login#token={token}")
        print(
            "(the token is stored only as a hash: keep this link; --new-organiser-token makes another)"
        )
    else:
        print(
            f"organiser sign-in: http://{shown}:{args.port}/login (with your organiser token)",
            flush=True,
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    doc = cmd_serve.__doc__ or ""
    p = subparsers.add_parser("serve", help=doc.splitlines()[0], description=doc)
    p.set_defaults(func=cmd_serve)
    p.add_argument("--runs", default="runs", help="folder of runs and checkpoints (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default="", help="SQLite store (default: RUNS/serve.sqlite)")
    p.add_argument("--device", default="cpu", help="device for generation (cpu, cuda)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for CPU generation (0 = torch's default; 1 on a busy shared machine)",
    )
    p.add_argument(
        "--new-organiser-token", action="store_true", help="print a new organiser sign-in link"
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")
