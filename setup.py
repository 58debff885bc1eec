# Only here because the fused kernels live in the top-level kernels/ folder and install as the package
# `wsi_vssm_kernels`; all other metadata is in pyproject.toml.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["wsi_vssm", "wsi_vssm.*"]) + ["wsi_vssm_kernels"],
    package_dir={"wsi_vssm_kernels": "kernels"},
)
