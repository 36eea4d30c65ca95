"""Evaluation: the FID Inception-v3 feature extractor (Flax) and its weight converter.

``scm_jax.eval.inception`` loads converted weights and computes 2048-d pool3 features
(``load_inception``, ``inception_features``); ``scm_jax.eval.fid_weights`` converts the standard
PyTorch files (needs the optional ``torch`` extra); ``scm_jax.eval.nearest_neighbor`` scores
class-conditional samples by 1-nearest-neighbour label agreement. Submodules are imported on
demand, so importing this package stays light.
"""
