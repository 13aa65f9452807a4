"""The readers: one module per format a source is held in, each citing the tool whose rules it
follows; ``listing`` turns ``prepare.source`` into the tasks of its images."""
