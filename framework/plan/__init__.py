"""The planner: which layout of a model fits a cluster, how fast a step goes and what a run costs, before anyone
books the machines. `python -m launch.plan` is its entry point.

  devices.py   device models as data (spec sheets + named efficiencies; cpu measured at start-up)
  layers.py    per-token parameters, FLOPs and bytes kept for backward of each layer (formulas of the config)
  estimate.py  one layout: per-GPU memory split, F/B/W/F&B costs, all-to-all, the schedule's simulated step
  search.py    the layouts a cluster allows, ranked, as a table
  run.py       config -> validated plan -> plan.md, gantt.png, train_plan.yaml
"""
