"""`mtft report`: read run dirs, aggregate per balancer over seeds, present a table and plots."""
