"""Params: the schema (`schema`), reading (`parse`), checks (`validate`), the stage table and
each stage's plan (`stages`), and the view of params a DVC stage may read (`stage_view`)."""
