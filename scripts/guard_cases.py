"""Bad device contents (devtools/faults.py), for compute-sanitizer memcheck: every fault unchecked must
give its documented result and touch no memory outside the arrays; every fault checked must raise
InvalidInputError naming it. Exits non-zero on a wrong result; memcheck reports the rest.

    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/guard_cases.py [--json PATH]

CuPy's memory pool is turned off, so that every array is an allocation of its own and an access past
its end is outside any allocation, where memcheck sees it (inside a pool block it would not).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "devtools"))
import faults  # noqa: E402
from gpu_cases import fresh_seed  # noqa: E402

from flashmla_cupy.errors import InvalidInputError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import cupy

    cupy.cuda.set_allocator(None)
    seed = fresh_seed()
    c = faults.case(seed)
    ref = c.reference()
    results, failed = [], 0
    for mode, table in (("unchecked", faults.UNCHECKED), ("checked", faults.CHECKED)):
        for name, build in table:
            fault = build(c)
            start = time.perf_counter()
            try:
                if mode == "unchecked":
                    out, lse = faults.run(c, fault)
                    cupy.cuda.runtime.deviceSynchronize()
                    outcome = faults.verify(fault, out, lse, c, ref)
                else:
                    try:
                        faults.run(c, fault, check=True)
                        raise AssertionError("no InvalidInputError")
                    except InvalidInputError as error:
                        arguments = [v.argument for v in error.violations]
                        assert arguments == fault.violations, f"named {arguments}, expected {fault.violations}"
                        missing = [text for text in fault.named if text not in str(error)]
                        assert not missing, f"{missing} not in: {error}"
                        outcome = {"raised": str(error)}
                ok = True
            except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
                ok, outcome = False, {"error": "".join(traceback.format_exception_only(exc)).strip()}
                failed += 1
            results.append({"mode": mode, "fault": name, "passed": ok,
                            "seconds": round(time.perf_counter() - start, 2), **outcome})
            print(f"{mode:9s} {name:40s} {'ok' if ok else 'FAILED: ' + outcome['error']}", flush=True)
    summary = {"seed": seed, "checked": len(results), "failed": failed, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    print(f"{len(results) - failed}/{len(results)} faults gave their documented result (seed {seed})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
