"""`tether sweep`: an Optuna study over config values, each trial a full `tether train` run in OUT/trial-<n>/.

The study lives in an Optuna RDB storage (SQLite file OUT/sweep.db by default; PostgreSQL or MySQL by URL), so
K worker processes on one machine and any number of machines with the same URL share it: the storage is the
only coordination. A sweep asks for N finished trials (completed or pruned) and every worker runs trials until
the study holds N:
- a trial whose worker dies (SIGKILL, a lost machine) stops sending heartbeats; after `stale_after_s` it is marked
  FAIL and a copy with the same values is queued, which resumes from the dead trial's last checkpoint in the same
  directory. Ctrl-C does the same at once. Re-running the command therefore resumes the sweep.
- when two workers start the last trial at the same instant, the one with the higher number sees that the N
  before it are taken, is marked FAIL (user attr `surplus`) before it trains, and nothing is counted twice.
Each trial also measures the alternative final models of its ema, wise_ft and merge regularizers (computed from the
trained weights, no retraining) as candidates: the chosen model may be a trial's model_ema/, model_wise_ft/ or
model_merge/.
Pruning: Optuna can only prune single-objective studies (Trial.report and should_prune raise for several
objectives), so intermediate eval losses prune only a sweep whose one objective is target.val_loss (median rule);
a trial whose loss turns NaN/inf is pruned in any sweep.
"""

from tether.harness.sweep.report import summary_table
from tether.harness.sweep.run import run_sweep

__all__ = ["run_sweep", "summary_table"]
