"""pcpc.runtime.batch: batches of runs (pcpc batch): the batch file, the runner, the reports."""
