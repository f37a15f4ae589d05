"""``python -m jaxpoison plan``: prove that a study fits its machine before anything is loaded.

The planner builds the study's training segment from the model's ``config.json`` alone (abstract weights),
compiles it ahead of time for a TPU topology that need not be attached (:mod:`.targets`), and reads XLA's
per-chip memory, or XLA's own out-of-memory error. FLOPs are counted analytically (XLA counts a scanned layer
once) and turned into study time and chip-hours at a stated MFU. GPUs, which cannot be compiled for without one,
get the analytic memory model that the TPU compiles check. ``run`` calls :func:`.preflight.check_fit` first, so a
study that cannot fit stops in seconds with the same message.

Layers: ``targets`` (machines), ``known_models`` (configs without weights), ``shapes`` (study config -> shapes),
``program`` (the abstract program and its compile), ``model`` (analytic FLOPs and memory), ``planner`` (the plan),
``cli`` (the command), ``preflight`` (the check ``run`` makes).
"""
