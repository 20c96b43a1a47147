"""Installs rmc_jax. Exact versions live in requirements.txt (`make test` uses them)."""

import setuptools

setuptools.setup(
    name="rmc_jax",
    version="0.1.0",
    description=("Relational Memory Core (Santoro et al., 2018) in JAX/Haiku, "
                 "with launchers for the paper's experiments."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The library and its command-line entry points (`python -m launch.train`).
    packages=setuptools.find_packages(include=["rmc_jax", "rmc_jax.*",
                                               "launch"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "dm-haiku>=0.0.17",
        "optax>=0.2.8",
        "jmp>=0.0.4",
        "absl-py>=2.5.1",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "numpy>=2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "chex>=0.1.92"],
        # Figures of launch.plot --out and launch.report.
        "plot": ["matplotlib>=3.9"],
        # Only for --config.dataset=tfds:NAME (not pinned; about 1.6 GB).
        "tfds": ["tensorflow-cpu", "tensorflow-datasets"],
    },
    license="Apache-2.0",
)
