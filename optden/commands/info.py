"""``optden info``: which backends and devices are usable, and why not."""
from __future__ import annotations

import json


def run(args) -> int:
    import optden

    print(json.dumps(optden.info(), indent=2, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="usable backends and devices, and why not")
    p.set_defaults(func=run)
