"""JAX functional ops with custom_vjp and the JAX backends: not built yet in this version."""
