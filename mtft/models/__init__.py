"""Models: loading (Hub, local, the embedded tiny one), LoRA/QLoRA adapters, export."""
