"""loraflow: LoRA / QLoRA fine-tuning as a DAG of cached, checked stages."""
__version__ = "0.1.0"
