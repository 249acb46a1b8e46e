"""The holographic associative memory (seeds 002/003) as a persistent service.

`so4` makes token embeddings and context products, `clifford` the Cl(3,1) coefficients and
the Grace operator, `store` the memory itself, `persist` its `.holo` files and `api` the
HTTP endpoints. docs/memory.md has the design and the measurements.
"""
