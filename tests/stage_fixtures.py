"""Shared, cached fixtures for the stage tests: a tiny mini-world run folder (data from
build_data.py) and a tiny random RRM base. Built once per test session in a temp dir."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ROOT,
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_tiny_run(root: str) -> dict:
    """runs/<tmp>/data with a handful of contexts, and a random tiny RRM base."""
    import build_data
    import miniworld
    from miniworld import bases
    run = os.path.join(root, "run")
    if not os.path.exists(os.path.join(run, "data", "stats.json")):
        build_data.main(build_data.Args(run_dir=run, n_train=12, n_val=3, n_test=3,
                                        pool="mini:lenient,mini:eager", temperatures="1.0"))
    base = os.path.join(root, "rrm_random")
    if not os.path.exists(os.path.join(base, "config.json")):
        bases.build_rrm_base(base, miniworld.text_corpus(20), image_size=96)
    return {"run": run, "base": base}


def run_script(args: list, two_procs: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a stage script as a user would: python, or accelerate with 2 CPU processes."""
    if two_procs:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] + args
        env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    else:
        cmd, env = [sys.executable] + args, ENV
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\nSTDOUT\n{out.stdout[-3000:]}\nSTDERR\n{out.stderr[-3000:]}"
    return out
