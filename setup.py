"""Build script. The Triton kernels live in kernels/ and install as the subpackage fastkd.kernels."""
from setuptools import setup

setup(
    packages=["fastkd", "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
)
