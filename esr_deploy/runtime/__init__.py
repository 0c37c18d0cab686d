"""The runtime half of esr-deploy: what a serving process needs to run a bundle.

- :mod:`.manifest`: the typed, versioned manifest (:class:`~.manifest.Manifest`), read in
  one place and written back exactly;
- :mod:`.bundle_reader`: the one strict bundle reader (paths confined, checksums, digest,
  declared facts checked against the graph, device);
- :mod:`.upscaler`: ``esr_deploy.load(bundle).upscale(image)`` and ``esr-deploy upscale``;
- :mod:`.tiling` and :mod:`.resize_geometry`: tiles whose stitched output equals the untiled
  one (receptive field read from the ONNX graph).

The compile side (checkpoints, passes, export, precision, validation) lives beside it and is
never imported from here.
"""
