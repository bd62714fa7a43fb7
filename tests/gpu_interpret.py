"""Running a test module's Mosaic GPU interpret-mode cases in one child process.

The Mosaic GPU interpreter runs each warpgroup's program on XLA:CPU's thread pool, which has one
thread per core or per host device, whichever is more. On a 2-core machine a kernel with three
warpgroups deadlocks once two of them block on a barrier before the third has started (seen with
the default tiles). Four host devices give the pool four threads; the child process keeps that
setting away from the other tests. A module using this:

  @pytest.fixture(scope="module")
  def gpu_interpret_results():
      return gpu_interpret.run_worker(__file__)
  ...
  if __name__ == "__main__" and gpu_interpret.WORKER_FLAG in sys.argv:
      gpu_interpret.worker_main(GPU_CASES, run_case)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

WORKER_FLAG = "--gpu-interpret-worker"
_RESULT_MARKER = "GPU_INTERPRET_RESULTS "


def run_worker(test_file: str) -> dict[str, str]:
    """Runs `test_file` as the worker with 4 host devices; {case: "ok" or the error}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, test_file, WORKER_FLAG], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    return {"<worker>": f"worker exited {proc.returncode}:\n{proc.stderr[-3000:]}"}


def worker_main(cases, run_case) -> None:
    """In the child: run every case, print the results for run_worker."""
    results = {}
    for name in cases:
        try:
            run_case(name)
            results[name] = "ok"
        except Exception:  # reported by the parent's test of this case
            results[name] = traceback.format_exc()[-3000:]
    print(_RESULT_MARKER + json.dumps(results), flush=True)


def case_result(results: dict[str, str], name: str) -> str:
    """A case's result, or the worker's own failure when it reported none."""
    return results.get(name, results.get("<worker>", f"no result for {name!r}"))
