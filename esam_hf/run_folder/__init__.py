"""One run's output folder: its record, the files it wrote, its checkpoints, and who may write to it.

A training run (`esam-hf train`, or one run of `esam-hf reproduce`) owns one output folder. This package is
everything about that folder; the commands build on it. Its modules: `record` (the record and its manifest),
`resume` (checkpoints: which are complete, which one to resume) and `claim` (the claim, the lock and replacing
a run).

- **The record**, `esam_run.json`: the settings that determine the result, the method, the status (running,
  finished, failed, interrupted or diverged) and the *manifest*: every path the run wrote (checkpoints, the
  model and its code, logs, card, results, timeline), each with its type and a fingerprint. The record is
  written atomically as the run goes: before a write whose outcome is unknown (a checkpoint, the final save,
  the card) it names the folder being written, and after it the paths written. So a run killed at any moment
  leaves a record that accounts for every file it wrote (`RunFolder`, `RunFolderCallback`, `write_json`).
- **Replacing a run** (`--overwrite_output_dir`) deletes exactly the manifest's paths, and only those
  unchanged since the run wrote them. Anything else in the folder (a file of the user's, a file of the run
  that has changed, a file of the user's inside a checkpoint) is named and the new run refused, before
  anything is deleted. A folder without a record of ours is never cleared, and symbolic links are never
  followed (`claim_output_dir`, `OutputDirClaim`).
- **Checkpoints**: which are complete (`checkpoint_problem`), which one to resume (`resolve_checkpoint`),
  and whether it is the run's last step, so that resuming finishes without training (`checkpoint_ends_run`).
- **The lock**: a file created exclusively, so a second run into the same folder is refused, not raced;
  one left by a killed run is taken over (`_take_lock`).
"""

from .claim import OutputDirClaim, claim_output_dir
from .record import (HASHED_SIZE, LOCK_NAME, PROG, RUN_RECORD, Contents, FolderInTheWay, RunFolder, RunFolderCallback,
                     in_the_way_message, read_json, read_record, settings_differences, write_json)
from .resume import (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, checkpoint_ends_run, checkpoint_problem, checkpoints,
                     resolve_checkpoint)

__all__ = [
    "CHECKPOINT_STATE", "CHECKPOINT_WEIGHTS", "HASHED_SIZE", "LOCK_NAME", "PROG", "RUN_RECORD", "Contents",
    "FolderInTheWay", "OutputDirClaim", "RunFolder", "RunFolderCallback", "checkpoint_ends_run", "checkpoint_problem",
    "checkpoints", "claim_output_dir", "in_the_way_message", "read_json", "read_record", "resolve_checkpoint",
    "settings_differences", "write_json",
]
