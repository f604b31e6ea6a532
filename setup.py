from setuptools import setup

setup(
    name="ddpm-fast",
    version="0.2.0",
    description="Denoising Diffusion Probabilistic Models with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels live in the top-level folder kernels/ but are imported as
    # ddpm_fast.kernels: a bare `kernels` import name belongs to another package.
    packages=["ddpm_fast", "ddpm_fast.tools", "ddpm_fast.kernels"],
    package_dir={"ddpm_fast": "ddpm_fast", "ddpm_fast.tools": "ddpm_fast/tools", "ddpm_fast.kernels": "kernels"},
    install_requires=[
        # The supported range, proven by CI at both ends (.ci/run): torch 2.11 (Triton 3.6) to the newest.
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "safetensors>=0.4",
    ],
    extras_require={
        # FID / Inception Score: torchmetrics' metrics on torch-fidelity's port of the TF Inception
        "fid": ["torchmetrics>=1.4", "torch-fidelity>=0.3"],
        "tensorboard": ["tensorboard>=2.14"],
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3.5",
            "ruff>=0.5",
            "scikit-learn>=1.3",
            "diffusers>=0.30",
            "torchmetrics>=1.4",
            "torch-fidelity>=0.3",
            "tensorboard>=2.14",
        ],
    },
    entry_points={"console_scripts": ["ddpm-fast = ddpm_fast.cli:main"]},
)
