"""The `equipoise` command. Each sub-command imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from equipoise.settings import SettingsError, get_settings

Handler = Callable[[argparse.Namespace], int]


def _db(args: argparse.Namespace) -> int:
    from equipoise.db import migrate
    from equipoise.db.session import make_engine

    url = str(get_settings().database_url)
    if args.db_command == "upgrade":
        migrate.upgrade(url, args.revision)
    elif args.db_command == "downgrade":
        migrate.downgrade(url, args.revision)
    engine = make_engine(url)
    print(f"database {engine.url.render_as_string(hide_password=True)} at revision {migrate.current_revision(engine)}")
    engine.dispose()
    return 0


def _keys(args: argparse.Namespace) -> int:
    from equipoise.db import crud
    from equipoise.db.models import Role
    from equipoise.db.session import get_engine, session_scope

    with session_scope(get_engine()) as session:
        if args.keys_command == "create":
            key, raw = crud.create_api_key(session, args.name, Role(args.role))
            print(f"created key {key.name!r} ({key.role.value}); store it now, it is not shown again:\n{raw}")
        elif args.keys_command == "list":
            for key in crud.list_api_keys(session):
                state = "revoked" if key.revoked_at else "active"
                print(f"{key.name}\t{key.role.value}\t{key.prefix}…\t{state}\t{key.created_at:%Y-%m-%d %H:%M}")
        elif not crud.revoke_api_key(session, args.name):
            print(f"no active key named {args.name!r}", file=sys.stderr)
            return 1
    return 0


def _not_yet(name: str) -> Handler:
    def handler(_args: argparse.Namespace) -> int:
        print(f"equipoise {name}: not available in this version yet", file=sys.stderr)
        return 2

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equipoise", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database migrations")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="migrate to a revision (default: head)").add_argument(
        "revision", nargs="?", default="head"
    )
    db_commands.add_parser("downgrade", help="migrate down to a revision").add_argument("revision")
    db_commands.add_parser("current", help="show the current revision")
    db.set_defaults(handler=_db)

    keys = commands.add_parser("keys", help="API keys (stored hashed)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument("--role", choices=["predict", "admin"], default="predict")
    keys_commands.add_parser("list", help="list keys (never the keys themselves)")
    keys_commands.add_parser("revoke", help="revoke a key by name").add_argument("name")
    keys.set_defaults(handler=_keys)

    for name, text in [
        ("serve", "run the HTTP service"),
        ("train", "train a model from a recipe"),
        ("export", "export a training run to a model artifact"),
        ("score", "batch-score call-centre logs"),
        ("monitor", "run the monitoring job"),
        ("worker", "run the retraining worker"),
    ]:
        commands.add_parser(name, help=text).set_defaults(handler=_not_yet(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        get_settings()
    except SettingsError as error:
        print(f"equipoise: {error}", file=sys.stderr)
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
