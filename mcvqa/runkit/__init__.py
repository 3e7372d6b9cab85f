"""Run features beside speed/ and scale/: finding the inputs, resuming, checking what the run's end needs, the
session's time budget, the uncertainty gate, the reports. They call the stages; no stage imports them."""
