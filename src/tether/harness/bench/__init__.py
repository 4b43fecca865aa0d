"""`tether bench`: does regularization measurably prevent forgetting and overfitting? Measured, on the demo's world.

Tasks (tether.synthetic: seed s generates a world of invented facts and pre-trains a tiny Llama on them; the facts
are every run's reference data, what must not be forgotten):
  arithmetic   the demo's fine-tune: 500 addition rows, 100 held-out rows, 200 steps at lr 1.5e-3. Plain
               fine-tuning learns the task and forgets the facts.
  small-data   the same task from its first 64 training rows for 300 steps (75 epochs): plain training run to
               the end overfits (the validation loss is lowest after ~40 steps and then climbs).
Every method of METHODS runs on both tasks at each strength of its grid for each seed; seed s is the world, the
pre-trained base and the training seed. --quick runs each method once (replay at 1% and 5%) on arithmetic and only
what check 4 needs on small-data. Each run is tether.run.train in its own directory, in worker processes with one
torch thread each; the runs keep their measures and logs, not their weights. wall.json, written last, marks a
finished run: running the command again skips finished runs (resume), so delete the output directory to measure
afresh.

Measures of each run, then mean and sample standard deviation over seeds (ratios below are ratios of the means):
  target loss   target.val_loss: token-weighted cross-entropy on the held-out rows
  forgetting    forgetting.delta_loss: the facts' loss after minus before; recall drop: share of facts no
                longer completed exactly (greedy) = recall before - recall after
  overfit gap   target val loss - target train loss
  wall time     seconds per run in its worker: load, measure before, setup (Fisher), train, measure after
The measured model is the final one (early stopping: the restored best checkpoint); for ema the average
(model_ema/); for intruder the LoRA adapter after PEFT's intruder-dimension reduction (model_intruder/); for wise_ft
each alpha's interpolation (one run per seed gives every alpha; alpha 0 is the base model, whose target loss is
T_base below, and has no point of its own); for merge the least-forgetting candidate within 5% of the best target
loss.

Checks, printed PASS/FAIL, computed from the measured means (F: forgetting, T: target loss):
  1  the best of l2_sp, ewc, distill (KD), replay on arithmetic: some strength has 1 - F/F_plain >= 50% at
     T/T_plain - 1 <= 5%
  2  replay at ratio 0.05 on arithmetic: 1 - F/F_plain >= 50%
  3  wise_ft on arithmetic: some alpha < 1 with 1 - F(alpha)/F(1) >= 50% (forgetting recovered) and
     (T_base - T(alpha)) / (T_base - T(1)) >= 90% (target gain kept)
  4  small-data: early stopping and the best of weight_decay / dropout / label_smoothing (each at its best
     strength) have a lower T than plain training run to the end
  5  retention-aware checkpoint choice, plain fine-tuning on arithmetic evaluated every 20 steps with
     early_stopping.forgetting_budget 2.0 (the best T among evaluations whose F is at most 2.0): the restored
     checkpoint has F <= 2.0 on every seed where some evaluation was within the budget (the others restore the
     least forgetting), and 1 - F/F_alone >= 50%, F_alone being the F (as tracked) of the same runs' evaluation
     with the lowest T, the checkpoint the target alone would restore
  6  merge on arithmetic (one run per seed, its candidates: global alpha = WiSE-FT, per layer, DARE, TIES, Fisher):
     among the candidates within 5% of the best T, merge's least-forgetting candidate recovers more of the
     forgetting (1 - F/F(alpha 1), mean over seeds) than WiSE-FT's, i.e. the global alphas'
Best strength of a method: on arithmetic the least forgetting among its strengths within 5% of plain's T (none
within: the lowest T); on small-data the lowest T. Both choices look at the validation data, as early stopping does.
"""

from tether.harness.bench.run import run_bench

__all__ = ["run_bench"]
