"""Local launcher plugin: one worker process on this machine (the default for one worker)."""
