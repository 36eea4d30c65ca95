"""Networks: the EDM2-style sCM U-Net, a toy MLP, and the adaptive weighting head.

``build_network(model_cfg)`` (``scm_jax.networks.build``) turns a config's ``model`` section into
a :class:`NetworkDef`; the modules themselves never see a config.
"""

from scm_jax.networks.build import REMAT_POLICIES, NetworkDef, build_network, check_remat
from scm_jax.networks.edm2_unet import EDM2UNet
from scm_jax.networks.layers import MPConv, project_weights
from scm_jax.networks.mlp import MLPNet
from scm_jax.networks.presets import EDM2_CHANNELS
from scm_jax.networks.weighting import AdaptiveWeight

__all__ = [
    "EDM2_CHANNELS",
    "REMAT_POLICIES",
    "AdaptiveWeight",
    "EDM2UNet",
    "MLPNet",
    "MPConv",
    "NetworkDef",
    "build_network",
    "check_remat",
    "project_weights",
]
