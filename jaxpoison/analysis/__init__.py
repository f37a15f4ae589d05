"""Analysis of trained adapters: :mod:`.weight_shift` (per-layer features, tests across seeds), :mod:`.detector`
(poisoned-adapter detector, AUC with CIs), :mod:`.mitigation` (seed 003's shrink over a grid), :mod:`.plots`, and
:mod:`.run`, the ``python -m jaxpoison analyze`` command that applies them to a run folder or to PEFT adapters.
Nothing is imported here, so ``import jaxpoison.analysis.weight_shift`` does not pull in the plots."""
