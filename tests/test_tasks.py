"""prepare's process pool: ordered results, and a failing task that can never hang it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from cdsam.data.tasks import pool_map


def _square(x: int) -> int:
    return x * x


def test_results_come_back_in_order():
    assert list(pool_map(_square, range(40), 2, 40)) == [x * x for x in range(40)]


# A worker that raises while others are mid-put on the result queue: the pool used to be torn
# down with Pool.terminate(), which could kill a worker holding the queue's lock and leave
# prepare waiting for ever (seen about once in a hundred calls). Many rounds, under load, in a
# child process with a deadline.
HAMMER = textwrap.dedent("""
    import sys
    from cdsam.data.tasks import pool_map

    def work(x):
        if x == 3:
            raise ValueError("bad file")
        return bytes(200_000)  # big results: workers spend their time in put()

    for _ in range(int(sys.argv[1])):
        try:
            for _ in pool_map(work, range(64), 2, 64):
                pass
        except ValueError:
            pass
        else:
            raise SystemExit("the failing task did not raise")
    print("ok")
""")


def test_a_failing_task_never_hangs_the_pool(tmp_path):
    script = tmp_path / "hammer.py"
    script.write_text(HAMMER)
    run = subprocess.run([sys.executable, str(script), "60"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
