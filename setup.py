"""btm: Branch-Train-Merge and c-BTM forests of expert LMs, on SLURM or locally."""
from setuptools import find_packages, setup

# launcher/ and analysis/ must import on a login node without fairseq or torch: their core
# dependencies are the light ones below; fairseq_ext needs the "fairseq" extra.
core = [
    "numpy>=1.26",
    "pandas>=2.1",
    "pyarrow>=14",
    "PyYAML>=6",
    "submitit>=1.5",
    "tqdm>=4.60",
    "matplotlib>=3.8",
    "filelock>=3.12",
]
fairseq = [
    "torch>=2.1",  # the exact build is chosen by scripts/setup_env.sh (BTM_TORCH_SPEC)
    "fairseq-fixed==0.12.3.1",
    "sentencepiece>=0.2",
    "safetensors>=0.4",
    "scikit-learn>=1.4",
]
test = [
    "pytest>=8",
    "pytest-timeout>=2.2",
    "hypothesis>=6.100",
]

setup(
    name="btm",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["launcher", "launcher.*", "fairseq_ext", "fairseq_ext.*", "analysis", "analysis.*"]),
    package_data={"launcher": ["configs/*.yaml"]},
    include_package_data=True,
    install_requires=core,
    extras_require={"fairseq": fairseq, "test": test},
    entry_points={"console_scripts": ["btm = launcher.cli:main"]},
)
