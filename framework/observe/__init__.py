"""What the user sees: rank-0 console, progress bar, metrics files, plots, the end-of-run summary."""
