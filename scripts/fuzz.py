"""``./dev fuzz [--minutes N]``: the decoder property tests with random seeds until time is up.

Each round runs the property tests of tests/streams/test_decode_totality.py (and the
schema property tests) under the hypothesis profile ``fuzz`` (tests/conftest.py: random
data, ``ADLOOP_FUZZ_EXAMPLES`` examples per test, the ``@reproduce_failure`` blob
printed) with a fresh seed. The first failing round prints pytest's report (the
falsifying bytes, the blob) and the command that replays it, and exits 1.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

TESTS = ["tests/streams/test_decode_totality.py", "tests/streams/test_schemas.py"]
SELECT = "decode_is_total or decoders_"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to fuzz")
    parser.add_argument("--examples", type=int, default=2000,
                        help="examples per property test per round")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first round (later rounds draw new seeds)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    env = dict(os.environ, ADLOOP_FUZZ_EXAMPLES=str(args.examples))
    rng = random.SystemRandom()
    rounds = 0
    seed = args.seed
    while True:
        if seed is None:
            seed = rng.randrange(2**32)
        left = deadline - time.monotonic()
        if rounds and left <= 0:
            break
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "--hypothesis-profile=fuzz", f"--hypothesis-seed={seed}", "-k", SELECT, *TESTS]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=max(left, 60.0) + 120)
        except subprocess.TimeoutExpired:
            print(f"round {rounds + 1} (seed {seed}) ran past the time limit; stopping")
            break
        rounds += 1
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout[-20000:])
            sys.stderr.write(proc.stderr[-5000:])
            print(f"\nFAILED in round {rounds}, seed {seed}. Reproduce with:\n"
                  f"  ADLOOP_FUZZ_EXAMPLES={args.examples} ./dev test -x -k '{SELECT}' "
                  f"--hypothesis-profile=fuzz --hypothesis-seed={seed} {' '.join(TESTS)}\n"
                  "or paste the @reproduce_failure line above onto the failing test.")
            return 1
        print(f"round {rounds}: seed {seed} passed in {time.monotonic() - started:.0f}s "
              f"({proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''})",
              flush=True)
        seed = None
    print(f"fuzz: {rounds} rounds, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
