"""Hand-off and scale-out: Triton model repository export, the inference service (Open
Inference Protocol v2 on Ray Serve), batch jobs and build matrices on Ray."""
