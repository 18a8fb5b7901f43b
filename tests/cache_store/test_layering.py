"""cache_store depends on neither Ray nor the workers (dependencies point workers -> cache_store)."""

import subprocess
import sys


def test_cache_store_imports_no_ray_and_no_workers():
    code = ("import sys, lessserve.cache_store, lessserve.cache_store.local_redis, lessserve.cache_store.store\n"
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'lessserve.workers', "
            "'lessserve.cluster'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
