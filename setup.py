from setuptools import find_packages, setup

setup(
    name="vitadapt",
    version="0.1.0",
    description="Adaptive-token Vision Transformers (ATS, EViT, A-ViT, AdaViT, DVT) on one backbone",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(exclude=("tests", "tests.*", "configs", "tools")),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=0.9.16",
        "fvcore>=0.1.5.post20221221",
        "iopath>=0.1.9",
        "yacs>=0.1.8",
        "simplejson",
        "av>=10.0",
        "tensorboard",
        # figures: tools/plot.py, tools/benchmark.py --plot, the DVT curves of the test job
        "matplotlib>=3.6",
        # only for the built-in `digits` demo data set (its bundled 8x8 handwritten digits)
        "scikit-learn",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout"]},
)
