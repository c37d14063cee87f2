"""The `mtft train` recipe: the composed config, its validation, and the named builders run top to bottom."""
