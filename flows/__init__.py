"""The Prefect flow and deployments, and the `loraflow` command line: wiring only, no stage logic."""
