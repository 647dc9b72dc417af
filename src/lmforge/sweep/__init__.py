"""`lmforge sweep RECIPE --space SPACE.yaml`: search over recipe keys, judged by the evaluation.

- space.py   the search space file: keys, objective, constraints, budget, sampler, pruner
- cache.py   trials share finished stages: a stage whose key another trial already
             finished is linked, not rerun (a fine-tuning sweep pre-trains once)
- trial.py   one trial: overrides → `run_recipe` into its own folder → objective;
             reports validation to the engine so hopeless trials stop early
- engine.py  Optuna driver (SQLite study in the sweep folder: resumable, shareable)
- ray.py     Ray Tune driver for a cluster, calling the same trial function
- report.py  sweep.json, best recipe, key importances, plots, report.html/md
"""
