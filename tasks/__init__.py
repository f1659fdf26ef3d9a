"""One module per pipeline stage: its logic as plain functions and a `run(params)`, started as
`python -m tasks.<stage>` by dvc.yaml and by the Prefect flow."""
