"""Sweeps: many ordinary runs of one recipe over a grid of `--set` overrides, a leaderboard and a
Pareto front over objectives read from each run's report.json (docs/sweep.md).

grid.py        --grid parsing and the product of trials
objectives.py  metric names, --objective / --constraint parsing, values from a report.json
pareto.py      the non-dominated front
executors.py   how trials run: local subprocess pool (default) or Ray tasks
driver.py      validation, the build and timing phases, resume, sweep.json
report.py      sweep.json, sweep.md, sweep.html
"""
