"""Run the orders' tasks: ``logq worker orders_app:app --workers 2`` does
the same with the pool's default breaker; this script tunes the breaker
for the demo's short outage (the pool's circuit breaker is logq._retry's:
open at >= 50 % failures of at least 6 outcomes within 3 s, for 1 s, then
probes)."""

from __future__ import annotations

import argparse

from orders_app import app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    pool = app.pool("orders_app:app", workers=args.workers, backoff_base=0.2, backoff_max=2.0,
                    breaker_threshold=0.5, breaker_min_calls=6, breaker_window=3.0,
                    breaker_cooldown=1.0)
    st = pool.run()         # until SIGTERM or SIGINT: finishes what workers hold, then returns
    print(f"worker: processed {st.processed}, failed attempts {st.failed}, retried {st.retried}, "
          f"dead-lettered {st.dead_lettered}, breaker opened {st.breaker_opened} time(s)", flush=True)


if __name__ == "__main__":
    main()
