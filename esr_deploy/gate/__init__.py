"""The latency regression gate: is a candidate engine significantly slower than a reference?

``esr-deploy bench`` (and a CI job) time a *candidate* engine bundle against a *reference*:

- another bundle, run here in the same process, interleaved with the candidate
  (:func:`.bench.compare_bundles`), e.g. the engine of the last release;
- or the median a manifest *recorded* when its bundle was compiled
  (:func:`.bench.compare_to_baseline`), when the reference engine is not at hand.

Both engines get the same seeded random input ``u * data_range``, ``u ~ U[0, 1)`` of shape
``1xCxHxW`` (``numpy.random.default_rng(seed)``; each engine scaled by its own manifest's
``data_range``). Each engine runs once untimed as a check that it accepts the shape, then
``warmup`` untimed and ``runs`` timed rounds through
:func:`esr_deploy.validate.latency.interleaved_times`: in every round the candidate, then
the reference, each as one untimed call directly followed by one timed call of the same
engine (``c, c*, f, f*``; ``*`` timed). Interleaving at this grain makes machine noise —
another job, frequency scaling — hit both engines alike; the untimed call before each timed
one makes the timed call see the engine's steady state (its thread pool awake, its weights
and buffers in cache), as a server calling one engine does, instead of the cost of switching
from the other engine (on a 2-core CPU that cost was about 60 ms on a 90 ms engine, the same
for both, biasing the ratio towards 1). It also matches the recorded baselines, which
``compile`` measures with consecutive calls of one engine.

Nothing here prints: :class:`.report.BenchReport` is what the CLI shows, and a regression is
raised as :class:`.report.LatencyRegression` (exit code 3) by
:meth:`.report.BenchReport.raise_for_regression`.

The parts: :mod:`.options` (defaults and settings, light enough for the CLI to import),
:mod:`.statistics` (the paired bootstrap), :mod:`.engines` (opening bundles through the runtime's
one reader, inputs, timed rounds), :mod:`.report` (the result and its verdict), :mod:`.bench`
(the two comparisons).
"""
