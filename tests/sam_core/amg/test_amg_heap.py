"""keep_freed_heap_memory applies on glibc and is a no-op elsewhere."""
import platform

from sam_core.amg.heap import keep_freed_heap_memory


def test_applies_exactly_where_glibc_is():
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_heap_memory() is on_glibc
    assert keep_freed_heap_memory() is on_glibc  # idempotent
