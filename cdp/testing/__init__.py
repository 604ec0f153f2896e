"""Helpers shared by the tests and the benchmarks, built with the library itself:
synthetic record batches, a domain written straight into a store, DRVA and site
configurations on free ports. Nothing in the daemons or the CLI imports this package."""
