"""Fix 'quiet': the "Double unpin" warning storm of LMCache's layerwise retrieve, counted instead of logged."""

from __future__ import annotations

import logging

from .hooks import logger
from .targets import MOD_MEMORY

# The "Double unpin" warning is logged by this module's logger (lmcache.logging.init_logger(__name__)).
DOUBLE_UNPIN_LOGGER = MOD_MEMORY
DOUBLE_UNPIN_TEXT = "Double unpin occurred"


class DoubleUnpinFilter(logging.Filter):
    """Let the first "Double unpin" warning through, drop and count the rest.

    WHY: in layerwise mode every retrieved memory object is unpinned twice (``retrieve_layer`` unpins
    each pinned object, then ``wait_for_save`` calls ``lookup_unpin(req_id)``), so a 16K blended request
    logs ~288 warnings (9 segments x 32 layers, ~12 ms). LMCache resets the pin count to 0 itself.

    A filter, not a level: ``lmcache.logging.init_logger`` gives every LMCache module logger its own
    handler, ``propagate = False`` and a level of its own when the module is imported, so a level set from
    outside never holds; a filter on the logger survives (init_logger clears handlers, never filters) and
    drops the record before any handler formats it.
    """

    def __init__(self, keep_first: int = 1) -> None:
        super().__init__()
        self.keep_first = keep_first
        self.seen = 0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        if DOUBLE_UNPIN_TEXT not in msg:
            return True
        self.seen += 1
        if self.seen <= self.keep_first:
            record.msg = msg + " [kvdemo plugin: further 'Double unpin' warnings are counted, not logged]"
            return True
        self.suppressed += 1
        return False


def current_filter() -> DoubleUnpinFilter | None:
    """The filter installed on LMCache's memory logger in this process, if any (found by class name, so a
    re-imported plugin module still finds the one an earlier import installed)."""
    for existing in logging.getLogger(DOUBLE_UNPIN_LOGGER).filters:
        if isinstance(existing, logging.Filter) and type(existing).__name__ == DoubleUnpinFilter.__name__:
            return existing  # type: ignore[return-value]
    return None


def remove_quiet_filter() -> None:
    """Take the filter off again (tests: the logger is process-wide and outlives a test)."""
    existing = current_filter()
    if existing is not None:
        logging.getLogger(DOUBLE_UNPIN_LOGGER).removeFilter(existing)


def install_quiet_filter() -> DoubleUnpinFilter:
    """Install the filter once per process (idempotent) and return it."""
    existing = current_filter()
    if existing is not None:
        return existing
    installed = DoubleUnpinFilter()
    logging.getLogger(DOUBLE_UNPIN_LOGGER).addFilter(installed)
    logger.info("kvdemo plugin: applied quiet (filter on logger %r drops repeated %r warnings)",
                DOUBLE_UNPIN_LOGGER, DOUBLE_UNPIN_TEXT)
    return installed
