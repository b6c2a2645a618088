"""Kiln installs one import namespace, `kiln`: its top-level folders (engine, kernels, server, benchmarks) are
`kiln.engine`, ... so nothing Kiln installs hides another distribution's module (a top-level `kernels` hid
Hugging Face's, which bitsandbytes imports), and importing Kiln logs nothing about it."""

import subprocess
import sys

PROBE = """
import importlib.util, logging
logging.basicConfig(level=logging.DEBUG)
top_level = [name for name in ("engine", "server", "kernels", "benchmarks", "cluster") if importlib.util.find_spec(name)]
import kiln.engine.loading, kiln.kernels.attention, kiln.server.app, kiln.benchmarks.cli
import bitsandbytes
print(top_level)
"""


def test_only_the_kiln_namespace_is_installed_and_bitsandbytes_logs_nothing_about_kernels(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "kernels" not in result.stderr
