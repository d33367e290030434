"""The one thin layer over orbax: what a checkpoint holds and how it is written and read.

A checkpoint `<workdir>/checkpoints/<step>/` holds three items:

  params   every model parameter (trainable and frozen), a nested dict of arrays
           (`nnx.State.to_pure_dict()`): all that evaluation and sampling need.
  train    {"opt_state", "rest", "step"}: optimiser moments, the model's non-parameter state
           (RNG keys and counts) and the step counter.
  meta     JSON: {"next_step", "config", "time"}. `next_step` is the data position: the input
           pipeline resumes by start_step, so the index of the next step is all it needs.

`<step>` is the number of updates applied; training resumes at step `<step>`.
Writes are asynchronous (orbax commits in a background thread while training continues) and
atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when every item is
finalised, so a checkpoint interrupted while being written is never listed or loaded (and the
leftover directory is removed when the next run opens the manager).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "meta")


class Checkpointer:
    """orbax `CheckpointManager` with the retro-jax items and retention policy.

    Args:
      directory: the checkpoint root (`<workdir>/checkpoints`); created unless read_only.
      keep_last: keep the N most recent checkpoints (`train.keep_last`).
      keep_every: also keep every checkpoint whose step is a multiple of M
        (`train.keep_every`; 0 = none).
      async_save: commit in a background thread (training continues meanwhile).
      read_only: open an existing directory for restoring only (eval, sample, retrofitting).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last,
            keep_period=keep_every or None,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ---------------------------------------------------------------- queries
    def latest_step(self) -> int | None:
        """The newest fully written checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ----------------------------------------------------------------- writes
    def save(self, step: int, *, params: Any, train: Any, meta: Mapping[str, Any]) -> bool:
        """Start writing checkpoint `step` (asynchronously). False if it already exists.

        `params` and `train` are pytrees of (sharded) jax arrays; every process must call this
        (orbax writes each process's shards and process 0 finalises).
        """
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(dict(meta)),
            ),
        )

    def wait(self) -> None:
        """Block until the pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    # ------------------------------------------------------------------ reads
    def _step_or_latest(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"no complete checkpoint in {self.directory}: train first "
                "(retro-jax train --config ... --workdir W)")
        return step

    def restore(self, step: int | None, *, abstract_params: Any, abstract_train: Any) -> dict:
        """{"params", "train", "meta"} of checkpoint `step` (None = latest).

        `abstract_*` are pytrees of `jax.ShapeDtypeStruct` with shardings: arrays come back
        with those shapes, dtypes and shardings (a different mesh than the one that wrote the
        checkpoint is fine).
        """
        step = self._step_or_latest(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                train=ocp.args.StandardRestore(abstract_train),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return {"params": restored["params"], "train": restored["train"],
                "meta": dict(restored["meta"])}

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the parameters of checkpoint `step` (None = latest): for eval and sampling."""
        step = self._step_or_latest(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"]

    def params_tree(self, step: int | None = None) -> dict:
        """The structure of checkpoint `step`'s params (None = latest) without reading them:
        a nested dict (string keys) of orbax `ArrayMetadata` (shape, dtype)."""
        step = self._step_or_latest(step)
        # The item's own handler: a manager that has not saved or restored `params` yet (a
        # reader) has no handler registered for it and would return no metadata.
        handler = ocp.StandardCheckpointHandler()
        return handler.metadata(self.directory / str(step) / "params").tree

    def restore_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of checkpoint `step` (None = latest)."""
        step = self._step_or_latest(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run directory or its `checkpoints/` directory -> the checkpoint root."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path
