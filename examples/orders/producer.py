"""Submit orders (the shop's front end, in its own process): one task per
order, idempotent by key.  Prints the task ids as JSON lines."""

from __future__ import annotations

import argparse
import json
import random

from orders_app import place_order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--orders", type=int, default=40)
    ap.add_argument("--first", type=int, default=1, help="first order number")
    args = ap.parse_args()
    rnd = random.Random(args.first)
    for n in range(args.first, args.first + args.orders):
        # every tenth order is empty: refused, it fails for good
        items = [] if n % 10 == 0 else [[f"sku-{rnd.randrange(100)}", rnd.randrange(1, 4),
                                         rnd.randrange(100, 5000) / 100] for _ in range(rnd.randrange(1, 4))]
        h = place_order.apply_async(args=(n, items), key=f"order:{n}")
        print(json.dumps({"order": n, "id": h.id}), flush=True)


if __name__ == "__main__":
    main()
