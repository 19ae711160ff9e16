"""``silo query``: run read-only SQL on a tenant's shard, one shard, or every shard.

    silo query [--tenant T | --shard S | --all-shards] [-p VALUE ...] [--json | --csv] SQL

Prints an aligned table by default. ``-p`` binds ``$1, $2 …`` in order; a value that
reads as a JSON number, ``true``/``false`` or ``null`` binds as that type, anything
else as a string (quote it as JSON, ``-p '"42"'``, to pass digits as a string).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from silo import cli_client


def parse_param(text: str) -> Any:
    try:
        v = json.loads(text)
    except ValueError:
        return text
    return v if v is None or isinstance(v, bool | int | float | str) else text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sql", help="a read-only SELECT over jobs, tasks, queues, "
                                    "tenant_counts or queue_counts")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tenant", default=None, help="run on the tenant's shard")
    where.add_argument("--shard", default=None, help="run on this shard id")
    where.add_argument("--all-shards", action="store_true",
                       help="run once over every shard of the server (cross-shard "
                            "aggregates, ORDER BY and LIMIT)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="VALUE",
                        help="bind $1, $2 … in order (JSON number/true/false/null, else text)")
    parser.add_argument("--csv", action="store_true", help="print CSV")
    cli_client._common(parser)


def _cell(v: Any) -> str:
    return "" if v is None else v if isinstance(v, str) else json.dumps(
        cli_client._jsonable(v), ensure_ascii=False)


def run(args: argparse.Namespace) -> int:
    params = [parse_param(p) for p in args.param]

    async def body(client) -> int:
        r = await client.query(args.sql, *params, tenant=args.tenant, shard=args.shard,
                               all_shards=args.all_shards)
        names = [n for n, _ in r.columns]
        rows = [[row.get(n) if isinstance(row, dict) else row for n in names] for row in r.rows]
        if args.json:
            cli_client._emit_json({"columns": [{"name": n, "data_type": t}
                                               for n, t in r.columns], "rows": r.rows})
        elif args.csv:
            w = csv.writer(sys.stdout)
            w.writerow(names)
            w.writerows([[_cell(v) for v in row] for row in rows])
        else:
            print(cli_client._table(names, [[_cell(v) for v in row] for row in rows]))
            print(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
        return 0

    return cli_client._run(args, body)
