"""Exits post-trained on a frozen backbone (the ``post-train`` command): PTEENet branches and class-based exits."""
