"""The model zoo: PyTorch definitions of the seed efficient-SR architectures.

Each loads its official checkpoint with ``load_state_dict(..., strict=True)`` (after the
checkpoint loader has stripped wrapper prefixes such as ``module.``); its recipe in
``recipes/`` names the class and writes out every constructor argument.

- ``esr_deploy.zoo.imdn:IMDN``: IMDN, Hui et al., ACM MM 2019 (IMDB + CCA); 0..1.
- ``esr_deploy.zoo.rfdn:RFDN``: RFDN, Liu et al., ECCVW 2020 (RFDB + ESA); 0..255.
- ``esr_deploy.zoo.rlfn:RLFN``: RLFN, Kong et al., CVPRW 2022 (RLFB + ESA); 0..255.
- ``esr_deploy.zoo.fmen:FMEN``: FMEN deploy form, Du et al., CVPRW 2022 (ERB + HFAB); 0..255.
- ``esr_deploy.zoo.dipnet:DIPNet``: DIPNet deploy form, Yu et al., CVPRW 2023 (pruned,
  re-parameterized RLFN-like; widths and bias flags from the recipe); 0..1.

Shared pieces (ESA, the pixel-shuffle upsampler, the conv helper) are in
:mod:`esr_deploy.zoo.blocks`. Importing this package does not import torch; import the
module of the architecture you need.
"""

from __future__ import annotations

#: Zoo architectures by recipe-style reference (``module:Class``), without importing them.
ARCHITECTURES: tuple[str, ...] = (
    "esr_deploy.zoo.imdn:IMDN",
    "esr_deploy.zoo.rfdn:RFDN",
    "esr_deploy.zoo.rlfn:RLFN",
    "esr_deploy.zoo.fmen:FMEN",
    "esr_deploy.zoo.dipnet:DIPNet",
)

__all__ = ["ARCHITECTURES"]
