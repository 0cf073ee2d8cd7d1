"""Publishing an index to the database: the trainer's indexing (trainer.index) ends at plain data, and here
it becomes a run that readers see whole or not at all (writer), behind `hsae index` (pipeline)."""
