"""The storage worker: the one process that owns every queue's segment files."""
