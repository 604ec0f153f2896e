"""The NBD protocol (docs/FORMAT.md §17): codec, backends, asyncio server.

Shared by the filter's exports (``iofilter_sim.nbd_capture``: writes go through the
capture path) and the instant-recovery mount (``rocva.mount``: reads from the store).
"""
