"""The commands on top: `mtft train`, `eval`, `generate`, `data preview`, `report`, `export`; no library imports them."""
