"""Hand-off and scale-out: running bundles under other serving systems (Ray, Triton)."""
