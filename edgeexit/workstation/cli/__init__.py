"""The workstation commands of the ``edgeexit`` CLI: train, sweep, post-train, convert."""
