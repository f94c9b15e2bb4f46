"""The catalog: every model edgeexit builds by id (EENets, PTEENets), and checkpoints that rebuild their model."""
