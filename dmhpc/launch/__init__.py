"""Python launches with submitit: grids of training runs with a leaderboard, and scaling studies.

    from dmhpc.launch import launch_grid, launch_scaling
    launch_grid("configs/grid/mmd-fisher-weights.yaml")   # OUT/<point>/, OUT/leaderboard.{csv,md}
    launch_grid("configs/study/deepmerge2.yaml")          # methods x grid: also OUT/summary.{csv,md},
                                                          # and OUT/validators.{csv,md} (select.all_validators)
    report_grid("configs/study/deepmerge2.yaml")          # the same tables from the runs so far; no launch
    launch_scaling("configs/scaling/resnet.yaml")         # OUT/scaling.{csv,md,png}
    tune("configs/tune/coral-fisher-entropy-laptop.yaml")   # OUT/study.journal, OUT/trials.{csv,md}

The same from the shell: `python launch/grid.py FILE`, `python launch/scaling.py FILE` and
`python launch/tune.py FILE` (or `dmhpc grid|scaling|tune FILE`).

Modules: `spec` (reading launch files, points), `grid` (grid files and their expansion),
`submit` (submitit executors, the checkpointable trainer job, waiting), `leaderboard`,
`summary` (mean ± std over seeds, gap closed), `validators` (label-free selection against the
oracle), `scaling`, `tune` (Optuna search by a label-free criterion). docs/cluster.md,
"Python launches (submitit)", documents the file formats.
"""

from dmhpc.launch.grid import expand, launch_grid, load_grid, point_name, report_grid, sample_space
from dmhpc.launch.leaderboard import leaderboard_rows, write_leaderboard
from dmhpc.launch.summary import summary_rows, write_summary
from dmhpc.launch.scaling import launch_scaling, load_study, scaling_table, steady_step_time
from dmhpc.launch.submit import TrainTask, make_executor, submit_points, wait_for
from dmhpc.launch.tune import load_tune, tune
from dmhpc.launch.validators import validator_rows, write_validators

__all__ = ["expand", "launch_grid", "load_grid", "point_name", "report_grid", "sample_space", "leaderboard_rows",
           "write_leaderboard", "summary_rows", "write_summary", "validator_rows", "write_validators", "launch_scaling",
           "load_study", "scaling_table", "steady_step_time", "TrainTask", "make_executor", "submit_points", "wait_for",
           "load_tune", "tune"]
