"""GPU smoke run: the user journey with the defaults, on whatever accelerator JAX finds.

  python -m benchmarks.smoke [--workdir=/tmp/smoke] [--skip=notebook,small]

Steps (each a child process, as a user would run it; one line per step with pass/fail and time):
  train_tiny        the README's first command, shortened (`auto` kernels)
  train_tiny_pallas the same with the GPU kernels asked for (zero-padded at tiny's dims)
  generate_greedy / generate_sampled / generate_mtp    launch.generate on the tiny run
  convert_logits    launch.convert orbax-to-hf (fp32), then transformers' logits vs ours
  notebook          notebooks/quickstart.ipynb end to end through nbclient, shortened
  train_small       configs/small.py for a few steps
  train_moonlight   moonlight_16b_a3b's shapes at 3 layers
Exits 1 if any step failed. Every step's output is kept under --workdir/logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dsv3_smoke", "Where runs and logs go.")
_SKIP = flags.DEFINE_list("skip", [], "Steps to leave out.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds per step.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

LOGITS_CHECK = """
import sys, numpy as np, torch, transformers, jax, jax.numpy as jnp
import dsv3_jax
from dsv3_jax.infer.generate import load_checkpoint
run, hf = sys.argv[1], sys.argv[2]
config, variables, _ = load_checkpoint(run)
# The check is of the converted weights: our fp32 XLA path at full fp32 matmul precision (the GPU
# kernels take bf16 operands, and XLA's default on a GPU may round f32 dots to TF32; either
# would hide a wrong tensor behind a loose bound).
config = config.replace(dtype="float32", attention_impl="xla", decode_impl="xla", moe_impl="xla")
tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 48))
with jax.default_matmul_precision("highest"):
    ours = np.asarray(dsv3_jax.forward(config, variables, jnp.asarray(tokens)).logits,
                      np.float64)
transformers.logging.set_verbosity_error()
model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
with torch.no_grad():
    theirs = model(torch.as_tensor(tokens)).logits.double().numpy()
err = np.abs(ours - theirs).max() / np.abs(theirs).max()
print(f"max |ours - transformers| / max |transformers| = {err:.2e}")
# fp32 both sides, different summation orders: 1e-4 of the largest logit (as the notebook).
sys.exit(0 if err < 1e-4 else 1)
"""

NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read("notebooks/quickstart.ipynb", as_version=4)
i = [k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])][0]
nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
    f"TRAIN_STEPS = 20\\nWORKDIR = {sys.argv[1]!r}\\nMAX_NEW_TOKENS = 16"))
NotebookClient(nb, timeout=900, kernel_name="python3").execute()
text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
assert "identical to greedy: True" in text, "speculative output differs from greedy"
print([line for line in text.splitlines() if "transformers" in line][-1:])
"""


def steps(w: str) -> list[tuple[str, list[str]]]:
    tiny = os.path.join(w, "tiny")
    train = [PY, "-m", "launch.train", "--config=configs/tiny.py"]
    gen = [PY, "-m", "launch.generate", f"--checkpoint={tiny}", "--prompt=import ",
           "--max_new_tokens=40"]
    return [
        ("train_tiny", [*train, f"--workdir={tiny}", "--config.steps=40"]),
        ("train_tiny_pallas", [*train, f"--workdir={w}/tiny_pallas", "--config.steps=40",
                               "--config.model.attention_impl=pallas",
                               "--config.model.moe_impl=pallas"]),
        ("generate_greedy", gen),
        ("generate_sampled", [*gen, "--temperature=0.8", "--top_p=0.95"]),
        ("generate_mtp", [*gen, "--speculative=mtp", "--timing_runs=2"]),
        ("convert_logits", [PY, "-m", "launch.convert", "orbax-to-hf", f"--checkpoint={tiny}",
                            f"--out={w}/hf_tiny", "--dtype=fp32"]),
        ("notebook", [PY, "-c", NOTEBOOK, f"{w}/notebook"]),
        ("train_small", [PY, "-m", "launch.train", "--config=configs/small.py",
                         f"--workdir={w}/small", "--config.steps=4", "--config.log_every=2",
                         "--config.eval_every=4", "--config.checkpoint_every=4"]),
        ("train_moonlight", [*train, f"--workdir={w}/moonlight", "--config.steps=6",
                             "--config.model.preset=moonlight_16b_a3b",
                             "--config.model.n_layers=3",
                             "--config.batch_size=8"]),
    ]


def tokens_per_s(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rates = [json.loads(line).get("tokens_per_sec") for line in f]
        rates = [r for r in rates if r]
        return f"{rates[-1]:,.0f} tokens/s (last window)" if rates else ""
    except OSError:
        return ""


def main(argv):
    del argv
    w = _WORKDIR.value
    logs = os.path.join(w, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        REPO, os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1")
    failed = []
    for name, cmd in steps(w):
        if name in _SKIP.value:
            print(f"{name:<18} skipped", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=_TIMEOUT.value)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        if rc == 0 and name == "convert_logits":
            check = subprocess.run([PY, "-c", LOGITS_CHECK, f"{w}/tiny", f"{w}/hf_tiny"],
                                   cwd=REPO, env=env, capture_output=True, text=True)
            rc, out = check.returncode, out + check.stdout + check.stderr
        with open(os.path.join(logs, f"{name}.log"), "w") as f:
            f.write(" ".join(cmd) + "\n" + (out if isinstance(out, str) else out.decode()))
        lines = [ln for ln in str(out).splitlines() if ln.strip()]
        detail = [ln for ln in lines if ln.startswith(("kernels on", "greedy", "sampled",
                                                       "speculative", "MTP acceptance",
                                                       "max |ours"))]
        if name.startswith("train"):
            detail.append(tokens_per_s(os.path.join(w, name.removeprefix("train_"))))
        status = "PASS" if rc == 0 else f"FAIL (rc {rc})"
        print(f"{name:<18} {status:<12} {time.perf_counter() - t0:7.1f} s  "
              f"{' | '.join(d for d in detail if d)}", flush=True)
        if rc != 0:
            failed.append(name)
            print("    " + "\n    ".join(lines[-12:]), flush=True)
    print(f"smoke: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)
