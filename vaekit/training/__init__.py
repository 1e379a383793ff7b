"""The fitting loop and what it needs: checkpoints, resume, signals, the flat parameter buffer."""
