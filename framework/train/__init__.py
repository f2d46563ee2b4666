"""The trainer: job set-up, the step loop, optimizer and schedule, losses."""
