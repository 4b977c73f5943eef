"""Every stage script parses its arguments and prints --help (one subprocess for all five)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["build_data.py", "sft_rrm.py", "gcpo.py", "flow_grpo.py", "evaluate.py"]


def test_every_script_has_help():
    code = ("import runpy, sys\n"
            "for s in %r:\n"
            "    sys.argv = [s, '--help']\n"
            "    try:\n"
            "        runpy.run_path(s, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (s, e.code)\n" % SCRIPTS)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    for s in SCRIPTS:
        assert f"usage: {s}" in out.stdout
