"""Examples for mmpareto-lightning, installed as the package ``mmpareto_examples``.

Modules:

- :mod:`mmpareto_examples.cg_digits`: CG-Digits, the CG-MNIST protocol built offline from scikit-learn's
  handwritten digits (a gray view and a colour-shortcut view, optionally a third noisy view).
- :mod:`mmpareto_examples.av_datasets`: CREMA-D and Kinetics-Sounds data modules reading the authors'
  preprocessed layout.
- :mod:`mmpareto_examples.models`: the Lightning models (small CNNs for CG-Digits, two ResNet-18 encoders
  for audio-visual data), all :class:`mmpareto_lightning.MMParetoModule` subclasses.
- :mod:`mmpareto_examples.preprocess_av`: raw wav/mp4 to the layout the data modules read.
- :mod:`mmpareto_examples.fake_data`: a tiny fake dataset in that layout, for tests and smoke runs.

The YAML configs used by ``mmpareto-lightning fit --config ...`` live in ``configs/``.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""Directory holding the shipped LightningCLI configs (``cg_digits.yaml`` etc.)."""

__all__ = ["CONFIG_DIR"]
