"""Orbax checkpoints of a study: the stacked train state + a JSON record of what produced it.

Layout: ``RUN_DIR/checkpoints/<step>/{state,meta}``. ``meta`` holds the variant table, the full config, package
versions, the base model's name and weight fingerprint, the data hash and the LoRA r / alpha / scale rule /
targets. Orbax writes each step into a temporary folder and renames it when complete, so a process killed
mid-save leaves the previous steps intact; a step that still fails to restore is reported and the previous
one is used. Nothing already saved is deleted by a failed restore.

Several processes (a multi-host job, :mod:`jaxpoison.distributed`): every process calls the same ``save`` and
``restore`` with the same global arrays; orbax writes each process's own shards (``state/ocdbt.process_<i>``)
and the primary process (0) the metadata and ``meta``, then commits the step once all have finished. The run
folder must therefore be shared. ``restore`` reads into whatever shardings the abstract state carries, so a
job restarts on another process count or mesh over the same (or other) devices.

``async_save``: ``save`` returns once the arrays are copied off the devices (donated buffers may be reused at
once; host arrays may be written to) and the files are written in the background while training goes on; a
next ``save``, ``wait`` or ``close`` waits for it. A process killed before the background write commits loses
only that step.
"""
from __future__ import annotations

import json
import pathlib
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


def package_versions() -> dict:
    import importlib.metadata as md
    out = {}
    for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


class Checkpoints:
    def __init__(self, run_dir: str | pathlib.Path, keep_last: int = 2, read_only: bool = False,
                 async_save: bool = False):
        self.dir = pathlib.Path(run_dir) / "checkpoints"
        if read_only and not self.dir.is_dir():
            raise CheckpointError(f"{run_dir} has no checkpoints/ folder: is it a jaxpoison run folder?")
        self.async_save = async_save and not read_only
        # cleanup: a step a killed process left half-written (orbax's tmp folder) is removed at the next start
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=not read_only, read_only=read_only,
                                            enable_async_checkpointing=self.async_save,
                                            cleanup_tmp_directories=not read_only)
        self.mgr = ocp.CheckpointManager(self.dir.absolute(), options=opts, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        # meta is copied: the caller may change its dict while an asynchronous save is still writing it
        self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(json.loads(json.dumps(meta)))))
        if not self.async_save:
            self.mgr.wait_until_finished()

    def wait(self) -> None:
        """Until the last ``save`` is on disk and committed."""
        self.mgr.wait_until_finished()

    def read_meta(self, step: Optional[int] = None) -> dict:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.dir}")
        step = steps[-1] if step is None else step
        f = self.dir / str(step) / "meta" / "metadata"
        try:
            return json.loads(f.read_text())
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.dir / str(step)} has unreadable metadata ({e}); "
                                  "the step is corrupt, use an earlier one") from None

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[int, Any, dict]:
        """Restore ``step`` (default: the newest that reads back whole), falling back to earlier ones."""
        steps = self.steps() if step is None else [step]
        errors = []
        for s in reversed(steps):
            try:
                out = self.mgr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return s, out["state"], dict(out["meta"])
            except Exception as e:  # corrupt / partial files: try the previous step
                errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                warnings.warn(f"checkpoint step {s} in {self.dir} could not be restored ({errors[-1]}); "
                              "trying the previous one")
        raise CheckpointError(f"no checkpoint in {self.dir} could be restored:\n  " + "\n  ".join(errors)
                              + "\nDelete the folder to start afresh, or restore a backup.")

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
