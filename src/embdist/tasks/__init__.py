"""Each task is a short script of calls to sources → geometry → pairwise, reporting to a RunLog."""
