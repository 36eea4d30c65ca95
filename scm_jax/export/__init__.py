"""Export to other frameworks (docs/export.md), and EDM2 weights in.

* ``state_dict``: network parameters as a PyTorch-style state dict (names, OIHW layouts) and the
  safetensors file (numpy only, no pickle);
* ``files``: the export folder (``model.safetensors`` + ``config.json``) that
  ``scm_jax.load_sampler``, ``scm_jax.torch.load_network``, sCD teachers and ``init_from`` read;
* ``stablehlo``: serialized ``jax.export`` functions of the network and the 1- and 2-step
  samplers (symbolic batch; cpu, cuda, tpu);
* ``onnx_export``: ONNX through the PyTorch module, checked with ONNX Runtime;
* ``edm2``: EDM2 state dicts as an sCD teacher;
* ``command``: ``scm-jax export`` and ``scm-jax import-edm2``.

torch, onnx and onnxruntime are imported only inside the functions that need them.
"""
