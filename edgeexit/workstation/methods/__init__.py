"""Early-exit methods on existing networks: PTEENet branches, class exits, cutting a network at named modules."""
