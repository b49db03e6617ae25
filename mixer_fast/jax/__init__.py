"""JAX functional ops with custom_vjp (issue 5: not part of this version yet)."""
