"""Kiln's top-level folders install under one `kiln` import namespace (`kiln.engine`, `kiln.kernels`,
`kiln.server`, `kiln.benchmarks`, `kiln.cluster`), so nothing Kiln installs can hide another distribution's module (a top-level
`kernels` hid Hugging Face's). pyproject.toml holds everything else; this file only maps the folders, which
pyproject's static tables could do only by naming every subpackage by hand."""

from setuptools import find_packages, setup

FOLDERS = ("engine", "kernels", "server", "benchmarks", "cluster")

setup(
    package_dir={"kiln": "."},
    packages=[f"kiln.{name}" for name in find_packages(include=[*FOLDERS, *(f"{folder}.*" for folder in FOLDERS)])],
)
