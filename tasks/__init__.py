"""One module per pipeline stage: its logic as plain functions and a `run(params)`, started as
`python -m tasks.<stage>` by dvc.yaml and by the Prefect flow."""
from loraflow.processes import die_with_parent

# First thing a stage process does, before its slow imports: die with whatever started it (`dvc repro`,
# the flow), so it never trains on as an orphan beside the next run.
die_with_parent()
