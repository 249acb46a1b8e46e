"""The resonator page and web SDK, shipped in the distribution as package data (hpi.web)."""
