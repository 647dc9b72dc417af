"""The `lmforge serve` sub-command."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    """Serve the web app: human-evaluation arena, chat playground, run dashboard.

    Binds 127.0.0.1 by default. On first start (or with --new-organiser-token) it
    prints an organiser sign-in link; the token is stored only as a hash, so keep it.
    --list-tokens and --revoke-token ID manage organiser tokens and exit.
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
    if args.list_tokens or args.revoke_token is not None:
        return manage_tokens(store, args.revoke_token)
    if args.export_preferences is not None:
        return export_study_preferences(store, args)
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
            "put it behind HTTPS before sharing invitation links, and name the host "
            "people use with --allowed-hosts (other Host headers are refused).",
            file=sys.stderr,
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    app = create_app(runs, db_path=db, device=args.device, security=security_settings(args))
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
    # Forwarded headers are read by the app's RequestGuard, and only from --forwarded-allow-ips.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=False)
    return 0


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def security_settings(args: argparse.Namespace):
    from lmforge.serve.security import SecuritySettings

    hosts = ["localhost", "127.0.0.1", "::1"]
    if args.host not in ("0.0.0.0", "::"):
        hosts.append(args.host)
    proxies = _names(args.forwarded_allow_ips)
    if args.trust_proxy and not proxies:
        proxies = ["127.0.0.1", "::1"]
    if args.session_hours <= 0:
        raise ValueError(f"--session-hours must be positive (got {args.session_hours})")
    return SecuritySettings(
        allowed_hosts=hosts + _names(args.allowed_hosts),
        allowed_origins=_names(args.allowed_origins),
        forwarded_allow_ips=proxies,
        session_hours=args.session_hours,
    )


def manage_tokens(store, revoke: int | None) -> int:
    """Print the organiser tokens (never their secret), after revoking `revoke` if given."""
    import time

    if revoke is not None:
        if not store.revoke_organiser(revoke):
            raise ValueError(f"there is no organiser token {revoke} (see --list-tokens)")
        print(f"revoked organiser token {revoke} and ended its sessions")

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "never"

    print(f"{'id':>4}  {'name':<16} {'created':<16}  {'last sign-in':<16}  live sessions")
    for t in store.organiser_tokens():
        print(
            f"{t['id']:>4}  {t['name']:<16} {when(t['created']):<16}  "
            f"{when(t['last_used']):<16}  {t['sessions']}"
        )
    store.close()
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
    p.add_argument(
        "--list-tokens", action="store_true", help="list organiser tokens (id, dates) and exit"
    )
    p.add_argument(
        "--revoke-token",
        type=int,
        metavar="ID",
        help="revoke organiser token ID (see --list-tokens), end its sessions, and exit",
    )
    p.add_argument(
        "--session-hours",
        type=float,
        default=12.0,
        help="an organiser sign-in lasts this long (default: 12)",
    )
    p.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated host names the app answers to, besides localhost, 127.0.0.1, "
        "::1 and --host (e.g. the public name behind a proxy; '*' = any)",
    )
    p.add_argument(
        "--allowed-origins",
        default="",
        help="comma-separated origins whose POSTs are accepted besides the app's own "
        "(e.g. https://eval.example.org behind a TLS proxy)",
    )
    p.add_argument(
        "--forwarded-allow-ips",
        default="",
        help="comma-separated proxy addresses whose X-Forwarded-Proto/Host/For are believed "
        "('*' = any)",
    )
    p.add_argument(
        "--trust-proxy",
        action="store_true",
        help="believe X-Forwarded-* from a proxy on this machine (127.0.0.1, ::1)",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")
    for flag, options in PREFERENCE_OPTIONS:
        p.add_argument(flag, **options)


# `--export-preferences` and its options: the flag, then its argparse keywords.
PREFERENCE_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--export-preferences",
        {
            "type": int,
            "metavar": "STUDY",
            "help": "write study STUDY's votes as a preference file (--out) for "
            "lmforge finetune --finetune.objective=dpo, and exit",
        },
    ),
    ("--out", {"default": "", "help": "with --export-preferences: the JSONL to write"}),
    (
        "--min-agreement",
        {
            "type": float,
            "default": 0.5,
            "help": "with --export-preferences: drop items whose winner has a smaller share "
            "of the votes (default 0.5: every item with a majority)",
        },
    ),
    (
        "--unweighted",
        {
            "action": "store_true",
            "help": "with --export-preferences: weight 1 for every pair instead of its agreement",
        },
    ),
)


def export_study_preferences(store, args: argparse.Namespace) -> int:
    """`--export-preferences STUDY --out FILE`: the study's decided items as preference pairs."""
    from lmforge.serve.preferences import export_preferences

    if not args.out:
        raise ValueError("--export-preferences needs --out FILE.jsonl")
    counts = export_preferences(
        store, args.export_preferences, args.out, args.min_agreement, not args.unweighted
    )
    dropped = {k: v for k, v in counts.items() if k != "kept"}
    print(
        f"wrote {counts.get('kept', 0)} preference pairs to {args.out}"
        + (
            f" (dropped: {', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})"
            if dropped
            else ""
        )
    )
    return 0
