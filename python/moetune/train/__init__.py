"""`moetune train` (see moetune.train.loop.train)."""
