"""Hand-off to serving stacks: Triton model repository export, the inference service, Ray jobs."""
