"""Evaluation of trained models: FID, the consistency error and a nearest-neighbour class score.

* FID: ``inception_net`` (the FID Inception-v3 as a Flax module), ``inception`` (converted
  weights to 2048-d pool3 features), ``fid_weights`` (the converter from the PyTorch files; needs
  the optional ``torch`` extra), ``features`` (the sharded feature pipeline and dataset
  statistics), ``fid`` (streamed statistics, the Fréchet distance, statistics files), ``npz``
  (reading those files), ``runner`` (FID of a run's samples), ``commands`` (``scm-jax fid-stats``
  and ``scm-jax eval``).
* The consistency error of a student against its teacher's PF-ODE per time: ``consistency`` (the
  math) and ``consistency_run`` (a run's pairs, teacher and cached reference).
* ``nearest_neighbor``: 1-nearest-neighbour label agreement of class-conditional samples.

Submodules are imported on demand, so importing this package stays light.
"""
